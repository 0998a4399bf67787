"""Errors that tell the user which setting or file to fix."""


class ConfigError(ValueError):
    """A config value, file or model cannot be used; the message names the key to change."""


class DataFormatError(ValueError):
    """A data file is malformed; the message names the file and line."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stops before the optimizer step."""


class NoObjectiveError(RuntimeError):
    """A job of a sweep whose sweeper optimises the jobs' return values (Optuna) ended without
    a finite value to return."""
