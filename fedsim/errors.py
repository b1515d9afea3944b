"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class FedsimError(Exception):
    """A problem with the user's input: config, data, model or run directory."""


class UsageError(FedsimError):
    """A bad command line."""


class ConfigError(FedsimError):
    """An impossible or unknown config value. The message names the key."""


class DataError(FedsimError):
    """A malformed data file. The message names the file and, when known, the row."""


class ModelError(FedsimError):
    """A missing or unreadable model directory."""


class BudgetExceededError(FedsimError):
    """A step would spend more privacy budget than the run was given."""
