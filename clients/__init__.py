"""Flower ClientApps of fedsim."""
