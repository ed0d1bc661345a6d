"""Helpers every stage shares: statistics, images, devices and processes, atomic JSON."""
