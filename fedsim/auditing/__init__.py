"""Empirical privacy auditing with canaries: the statistics live in `fedsim.auditing.statistics`."""
