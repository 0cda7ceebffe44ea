"""One error hierarchy. Every error amer raises on purpose is an :class:`AmerError`; the CLI prints its
message as one line and exits with its ``exit_code`` (2 for bad input, 1 for a run that cannot go on).

The input errors also subclass ``ValueError``, so library callers that catch ``ValueError`` keep working.
"""

from __future__ import annotations

__all__ = [
    "AmerError", "InputError", "ConfigError", "PatternError", "SelectorError", "DataError", "CheckpointError",
    "AnalysisError", "ExperimentError", "TrainingError",
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
