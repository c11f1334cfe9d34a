"""Kernel interfaces driven from Python: device-mapper and the NBD client, through their ioctls."""
