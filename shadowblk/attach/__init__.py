"""The VM's stable volume endpoint on the compute host, and how it switches over."""
