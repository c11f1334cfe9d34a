"""The delta stream: frames, the shipper on the primary and the applier on a shadow."""
