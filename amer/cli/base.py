"""What every ``amer`` command shares: the argument parser class and the mapping of errors to exit codes.

Every error amer raises on purpose is an :class:`~amer.errors.AmerError`: :func:`run` prints its message
as one line (no traceback) and returns its exit code (2 for bad input, 1 for a run that had to stop).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import typing
from collections.abc import Callable

from amer.errors import AmerError, InputError
from amer.fileread import os_error_line
from amer.logs import configure as configure_logging

__all__ = ["ArgParser", "UsageError", "fail", "run", "verbosity"]


class UsageError(InputError):
    """A command line that argparse rejected (unknown flag, bad value)."""


class ArgParser(argparse.ArgumentParser):
    """argparse whose errors are one line naming the problem (raised as :class:`UsageError`), not a usage dump."""

    def error(self, message: str) -> typing.NoReturn:  # type: ignore[override]
        message = re.sub(r"^argument (\S+): must be", r"\1 must be", message)  # from amer.configio.number_arg
        raise UsageError(f"{self.prog}: {message} (see --help)")


def fail(msg: str, code: int = 2) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def _out_of_memory(e: BaseException) -> bool:
    text = str(e)
    return (isinstance(e, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower()
            or "Storage size calculation overflowed" in text)  # sizes whose product passes 2^63 bytes


def _oom_detail(e: BaseException) -> str:
    m = re.search(r"allocate (\d+) bytes", str(e))
    if m:
        return f"an allocation of {int(m[1]) / 1e9:,.1f} GB failed"
    sizes = re.search(r"sizes=\[([\d, ]+)\]", str(e))
    if sizes:
        dims = [int(x) for x in sizes[1].split(",") if x.strip()]
        return f"a tensor of shape {tuple(dims)} is larger than any memory can hold"
    return "an allocation failed"


VERBOSITY_FLAGS = {"--quiet": "quiet", "-q": "quiet", "--verbose": "verbose", "-v": "verbose"}


def verbosity(argv: list[str]) -> tuple[str, list[str]]:
    """``(verbosity, the other arguments)``: ``--quiet``/``-q`` (warnings and errors only) and ``--verbose``/``-v``
    (debugging detail) are accepted anywhere on every command line, the last one winning."""
    level, rest = "normal", []
    for i, a in enumerate(argv):
        if a == "--":  # what follows is not ours to read
            rest += argv[i:]
            break
        if a in VERBOSITY_FLAGS:
            level = VERBOSITY_FLAGS[a]
        else:
            rest.append(a)
    return level, rest


def run(command: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run one command: messages configured by ``--quiet`` / ``--verbose`` (:mod:`amer.logs`); an AmerError
    becomes one line on stderr and its exit code; ``--help`` returns 0."""
    level, argv = verbosity(argv)
    configure_logging(level)
    try:
        return command(argv)
    except SystemExit as e:  # --help: argparse printed it; return rather than exit
        return int(e.code or 0) if not isinstance(e.code, str) else fail(e.code)
    except AmerError as e:
        return fail(str(e), e.exit_code)
    except (MemoryError, RuntimeError) as e:  # sizes a user chose (batch, width, vocabulary) that do not fit
        if isinstance(e, RecursionError):  # a reader that let one through: still one line, not a traceback
            return fail("an input is nested too deeply to read (thousands of levels of brackets)")
        if not _out_of_memory(e):
            raise
        return fail(f"out of memory: {_oom_detail(e)}; lower --batch-size, --seq-len or the model's dimensions")
    except BrokenPipeError:  # `amer sample | head`: the reader left; nothing to say, and nowhere to say it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python would complain again at exit
        return 1
    except OSError as e:  # the file system refused (full, read-only, busy): the input was fine
        return fail(os_error_line(e), 1)
    except KeyboardInterrupt:  # a command with state worth naming (train, experiments) says more itself
        print("interrupted", file=sys.stderr)
        return 130
