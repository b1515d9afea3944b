"""Flower server strategies of fedsim."""

from strategies.uls_strategy import UlsStrategy  # noqa: F401
