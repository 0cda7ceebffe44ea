"""One error hierarchy. Every error amer raises on purpose is an :class:`AmerError`; the CLI prints its
message as one line and exits with its ``exit_code`` (2 for bad input, 1 for a run that cannot go on).

The input errors also subclass ``ValueError``, so library callers that catch ``ValueError`` keep working.
"""

from __future__ import annotations

__all__ = [
    "AmerError", "InputError", "ConfigError", "PatternError", "SelectorError", "DataError", "CheckpointError",
    "AnalysisError", "ExperimentError", "TrainingError", "StorageError", "StoppedBySignal",
]


class AmerError(Exception):
    """Base of every deliberate amer error. The message is one line naming the problem and what is accepted."""

    exit_code = 2


class InputError(AmerError, ValueError):
    """Something a user wrote (a flag, a TOML key, a file, a pattern) is invalid."""


class ConfigError(InputError):
    """A configuration value or key is invalid; the message names the field and what is accepted."""


class PatternError(InputError):
    """A malformed pattern. ``position`` is the 0-based offset in the source string (or None)."""

    def __init__(self, message: str, position: int | None = None) -> None:
        super().__init__(message)
        self.position = position


class SelectorError(InputError):
    """A tap selector is malformed or selects nothing. ``position`` is the 0-based offset of the offending item
    in the selector string (or None)."""

    def __init__(self, message: str, position: int | None = None) -> None:
        super().__init__(message)
        self.position = position


class DataError(InputError):
    """A corpus or data file cannot be read as text documents; the message says what is accepted."""


class CheckpointError(InputError):
    """A checkpoint is missing, incomplete, corrupt or does not match the model."""


class AnalysisError(InputError):
    """A curvature or comparison request cannot be served (e.g. comparing different patterns)."""


class ExperimentError(InputError):
    """An experiment's data, settings or saved results are invalid."""


class TrainingError(AmerError, RuntimeError):
    """The run cannot continue (e.g. repeated non-finite losses); the message says why."""

    exit_code = 1


class StorageError(AmerError, OSError):
    """The file system refused a write (a full disk, a quota, a read-only mount): the input was fine, and
    what amer wrote before is intact."""

    exit_code = 1


class StoppedBySignal(AmerError):
    """The process was asked to stop (SIGINT, SIGTERM, SIGHUP): exit code 128 + the signal's number, as a shell
    reports a process that a signal ended."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
