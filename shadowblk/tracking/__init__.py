"""Delta tracking: which blocks of a volume were written, grouped into epochs."""
