"""Flower server strategies of fedsim."""

from strategies.dp_fedavg import DPFedAvg  # noqa: F401
