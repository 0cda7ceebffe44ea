"""Reading what a user named, and saying in one line why the file system refused something.

:func:`open_regular` opens a path only when it is a regular file (links followed): a FIFO would block the
reader forever and ``/dev/zero`` never ends, so anything else is refused by what it is, without a blocking
open. :func:`json_loads` makes JSON nested past Python's recursion limit a ``ValueError`` like any other
invalid JSON, so every reader's one-line error covers it. :func:`os_error_line` is the line a command prints
for an ``OSError`` it could not avoid (a full disk, a read-only mount), naming the file as the user knows it.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from amer.fileio import TEMP_RE

__all__ = ["json_loads", "file_kind", "open_regular", "read_regular", "read_file", "os_error_line"]

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def json_loads(text: str | bytes) -> Any:
    """``json.loads``, except that a text nested past Python's recursion limit (tens of thousands of brackets)
    raises a ``ValueError`` like any other invalid JSON, so every reader's one-line error covers it."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply to read (thousands of levels of brackets)") from None


def _kind(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return f"is {what}, not a regular file"
    return "is not a regular file"


def file_kind(path: str | Path) -> str | None:
    """None when ``path`` is a regular file (links followed); otherwise what it is instead, as the end of an
    error message (``"does not exist"``, ``"is a named pipe (FIFO), not a regular file"``...)."""
    try:
        return _kind(os.stat(path).st_mode)
    except FileNotFoundError:
        return "is a symbolic link to a path that does not exist" if os.path.islink(path) else "does not exist"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    except ValueError:  # a NUL in the name: no system call takes it
        return "is not a valid path (it holds a NUL character)"


def open_regular(path: str | Path, error: Callable[[str], Exception]) -> IO[bytes]:
    """``path`` opened for reading when it is a regular file (links followed); anything else raises
    ``error(why)``, ``why`` saying what it is. Opening never blocks: a FIFO is refused, not waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _CLOEXEC)
    except (OSError, ValueError) as e:
        raise error(file_kind(path) or f"cannot be read ({getattr(e, 'strerror', e)})") from None
    why = _kind(os.fstat(fd).st_mode)
    if why is not None:
        os.close(fd)
        raise error(why)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_regular(path: str | Path, error: Callable[[str], Exception]) -> bytes:
    """The bytes of regular file ``path`` (see :func:`open_regular`)."""
    with open_regular(path, error) as f:
        try:
            return f.read()
        except OSError as e:
            raise error(f"cannot be read ({e.strerror})") from None


_HINTS = {errno.ENOSPC: "the disk is full: free space or write elsewhere",
          errno.EDQUOT: "the disk quota is used up: free space or write elsewhere",
          errno.EROFS: "the file system is mounted read-only: write elsewhere",
          errno.EACCES: "you lack the permission: write elsewhere or change the folder's permissions",
          errno.EBUSY: "it is in use (a mount point or an open file): choose another path"}


def _real_name(path: str) -> str:
    """``path`` with amer's temporary names (``.step_000004.tmp-PID-NS``) given back their real ones: a message
    names the file a user knows."""
    parts = Path(path).parts
    return str(Path(*[m["name"] if (m := TEMP_RE.match(p)) else p for p in parts])) if parts else path


def os_error_line(e: OSError) -> str:
    """One line for an ``OSError`` a command could not avoid: the file, what the system said, what to do."""
    where = _real_name(os.fsdecode(e.filename)) if e.filename is not None else None
    what = e.strerror or str(e) or type(e).__name__
    hint = _HINTS.get(e.errno) if e.errno is not None else None
    return f"{where + ': ' if where else ''}{what}{'; ' + hint if hint else ''}"


def read_file(path: str | Path) -> bytes:
    """``Path.read_bytes`` for the files amer reads back (a meta.json, a config.json), except that anything but a
    regular file is an ``OSError`` saying what it is, raised without blocking on a FIFO: every caller's
    ``except OSError`` then covers it."""
    return read_regular(path, lambda why: OSError(errno.EINVAL, why, str(path)))
