"""The one error type users see.

A `DistillBEVError` is bad input or a broken contract that the user can fix: its message names the file or field,
what was expected, what was found and what to do. The CLI prints it as one line and exits non-zero; everything
else is a bug and keeps its traceback.
"""


class DistillBEVError(Exception):
    """A user-fixable error with a one-line, actionable message."""


class ConfigError(DistillBEVError):
    """A config file or override does not match its typed schema."""


class DataError(DistillBEVError):
    """A dataroot, table, sensor file or split is missing or malformed."""


class CacheError(DistillBEVError):
    """A teacher-feature cache is missing, partial, corrupt or incompatible."""


class CheckpointError(DistillBEVError):
    """A checkpoint is missing or does not fit the model it is loaded into."""
