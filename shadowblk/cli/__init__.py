"""The operator's CLI: one module per command or command group, registered in main.py."""
