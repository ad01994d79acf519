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


def one_line(exc: BaseException) -> str:
    """The user-facing one-line message of a DistillBEVError.

    An error raised inside a DataLoader worker reaches the main process re-created around the worker's formatted
    traceback ("Caught CacheError in DataLoader worker process 0. Original Traceback ..."); the original message is
    that traceback's last line, after "<module>.<ErrorClass>: ".
    """
    text = str(exc)
    if "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
        for candidate in (prefix, f"{type(exc).__name__}: "):
            if last.startswith(candidate):
                return last[len(candidate):]
        return last
    return " ".join(text.split("\n"))
