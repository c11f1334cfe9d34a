"""The live dashboard the manager serves at /dashboard/: a page, its script, and a stream of
the fleet's state (server-sent events, one message a second)."""
