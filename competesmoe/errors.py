"""Errors a user can act on. The command-line tools print these as one line, without a traceback."""


class CompeteSMoEError(Exception):
    """Base class: something in the user's input or files is wrong, and the message says what."""


class ConfigError(CompeteSMoEError, ValueError):
    """A config key is unknown, has the wrong type, or has a value out of range; the key is named."""


class DataError(CompeteSMoEError):
    """A data source or a prepared shard is missing, truncated or corrupt."""


class CheckpointError(CompeteSMoEError):
    """A checkpoint is incomplete, corrupt, or belongs to a different model."""
