"""Integrity: per-block checksums, checksum maps, tree compare and scrub."""
