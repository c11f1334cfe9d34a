"""Compiled Cython fast paths, built from csrc/ by setup.py (one module per .pyx file)."""
