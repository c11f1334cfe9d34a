"""Failure prediction from SMART data, latency and checksum discrepancies."""
