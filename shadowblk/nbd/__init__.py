"""The NBD protocol: wire constants, the server (handshake and transmission phases), backends."""
