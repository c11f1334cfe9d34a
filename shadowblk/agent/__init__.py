"""The per-server agent: hosts primary and shadow volumes as the manager orders."""
