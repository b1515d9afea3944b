"""Flower ServerApps of fedsim."""
