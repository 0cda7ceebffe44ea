"""Messages: every module logs to its own ``logging`` logger under ``amer``; whoever owns the process
configures them. The ``amer`` command does (:func:`configure`, ``--quiet`` / ``--verbose``). A library caller
that configures nothing sees warnings on stderr (Python's last-resort handler) and no progress notes; it can
configure logging itself, or call :func:`configure`.

Command results (a sample's text, a table, a listing) are not messages: commands print them. Progress
messages (INFO, DEBUG) go to stdout and problems (WARNING and above) to stderr, as amer's output always did, so
stderr holds only what went wrong; both are written through tqdm, so a progress bar showing stays whole.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["configure", "configured", "LEVELS"]

LEVELS = {"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.DEBUG}

class _TqdmAwareHandler(logging.Handler):
    """Writes each record as one line, progress to stdout and problems to stderr (read at each call, so a
    redirected or captured stream is honoured), through ``tqdm.write`` so an active progress bar is redrawn
    below it instead of being cut."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            try:
                from tqdm import tqdm
            except ImportError:  # tqdm is a dependency; without it there is no bar to protect
                print(msg, file=stream, flush=True)
            else:
                tqdm.write(msg, file=stream)
                stream.flush()
        except Exception:  # noqa: BLE001  (logging's own contract: a failing handler reports, never raises)
            self.handleError(record)


def configure(verbosity: str = "normal") -> None:
    """Show amer's messages on stderr at ``verbosity`` (``quiet``: warnings and errors; ``normal``: progress
    notes too; ``verbose``: debugging detail). Idempotent: calling it again only changes the level."""
    if verbosity not in LEVELS:
        raise ValueError(f"verbosity must be one of {sorted(LEVELS)}, got {verbosity!r}")
    root = logging.getLogger("amer")
    root.setLevel(LEVELS[verbosity])
    if not any(isinstance(h, _TqdmAwareHandler) for h in root.handlers):
        handler = _TqdmAwareHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.propagate = False  # one copy of each line, whatever the application's root logger does


def configured() -> str | None:
    """The verbosity :func:`configure` set in this process, or None (a process it never ran in): what a
    worker process needs to show its messages as its parent does."""
    root = logging.getLogger("amer")
    if not any(isinstance(h, _TqdmAwareHandler) for h in root.handlers):
        return None
    return next((name for name, level in LEVELS.items() if level == root.level), "normal")
