"""A whole fleet on one machine: a manager and N agents on loopback with file-backed volumes.

How a newcomer tries shadowblk (`shadowblk lab up`) and how tests build a fleet.
"""
