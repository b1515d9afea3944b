"""Empirical privacy auditing with canaries: the statistics live in `fedsim.audit.statistics`."""
