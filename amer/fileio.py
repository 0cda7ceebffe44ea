"""Every file amer writes is complete or absent, and amer deletes only what it wrote.

A file is written to a hidden temporary sibling, flushed to disk, then renamed over its name; a directory
(a checkpoint) is built under a temporary name and renamed, or swapped with the one it replaces in one
step where the system allows it. Clean-up removes files by the names amer gives them, never a whole tree,
so whatever else a user put in a folder survives.

``AMER_FAULT_AT=<point>`` kills the process at a named point (see :func:`fault_point`): the crash-safety
tests use it to stop a write half-way exactly where a power cut or ``kill -9`` could.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "FAULT_ENV",
    "atomic_write_bytes",
    "atomic_write_text",
    "fault_point",
    "fsync_dir",
    "json_text",
    "own_temp_files",
    "recover_dirs",
    "remove_own_files",
    "replace_dir",
    "temp_sibling",
    "write_json",
]

FAULT_ENV = "AMER_FAULT_AT"


def fault_point(name: str) -> None:
    """Die here, as ``kill -9`` would, when ``$AMER_FAULT_AT`` names this point (a test hook; unset, a no-op)."""
    if os.environ.get(FAULT_ENV) != name:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    kill = getattr(signal, "SIGKILL", None)
    if kill is not None:
        os.kill(os.getpid(), kill)
    os._exit(137)  # pragma: no cover - platforms without SIGKILL


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_sibling(path: Path, kind: str = "tmp") -> Path:
    """A hidden name next to ``path`` that no other writer (process or call) uses: ``.name.tmp-PID-NS``."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{time.monotonic_ns()}")


_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-\d+-\d+$")


def own_temp_files(folder: Path, is_own: Callable[[str], bool]) -> list[Path]:
    """Temporary siblings that a killed writer left behind in ``folder`` for the names ``is_own`` accepts."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if (m := _TEMP_RE.match(p.name)) and is_own(m["name"]))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling, fsync and ``os.replace``: complete or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fault_point(f"replace:{path.name}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """``text`` (UTF-8) at ``path``, atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _nonfinite_path(obj: Any, where: str = "") -> str | None:
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "(top level)"
    if isinstance(obj, dict):
        items: Iterable[tuple[Any, Any]] = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        found = _nonfinite_path(v, f"{where}.{k}" if where else str(k))
        if found:
            return found
    return None


def json_text(obj: Any, *, indent: int | None = 2, default: Callable[[Any], Any] | None = None) -> str:
    """Strict JSON: NaN and Infinity are not JSON, so a non-finite number is an error naming its key."""
    try:
        return json.dumps(obj, indent=indent, allow_nan=False, default=default)
    except ValueError as e:
        where = _nonfinite_path(obj)
        if where is None:
            raise
        raise ValueError(f"refusing to write non-finite number at {where!r}: JSON has no NaN or Infinity") from e


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2,
               default: Callable[[Any], Any] | None = None) -> Path:
    """``obj`` as strict JSON at ``path``, atomically."""
    return atomic_write_text(path, json_text(obj, indent=indent, default=default) + "\n")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_dir(tmp: Path, dst: Path, own_files: Iterable[str]) -> None:
    """Put the complete directory ``tmp`` at ``dst``. An existing ``dst`` is swapped out in one step where the
    system allows it, else moved to ``.dst.old-*`` first (which :func:`recover_dirs` puts back if a kill
    falls between the two renames); the old contents are then removed, file by file (``own_files``)."""
    if not dst.exists():
        os.rename(tmp, dst)
        fsync_dir(dst.parent)
        return
    if _exchange(tmp, dst):
        fsync_dir(dst.parent)
        fault_point(f"swap:{dst.name}")
        remove_own_files(tmp, own_files)
        return
    old = temp_sibling(dst, "old")
    os.rename(dst, old)
    fault_point(f"swap:{dst.name}")
    os.rename(tmp, dst)
    fsync_dir(dst.parent)
    remove_own_files(old, own_files)


def recover_dirs(folder: Path, is_own: Callable[[str], bool], own_files: Iterable[str]) -> None:
    """Finish what a killed :func:`replace_dir` or directory write left in ``folder``: a moved-aside ``.x.old-*``
    goes back to ``x`` when ``x`` is missing; leftover temporaries lose the files amer put in them."""
    own = list(own_files)
    for p in own_temp_files(folder, is_own):
        if not p.is_dir():
            continue
        m = _TEMP_RE.match(p.name)
        assert m is not None
        if m["kind"] == "old" and not (folder / m["name"]).exists():
            os.rename(p, folder / m["name"])
        else:
            remove_own_files(p, own)


def remove_own_files(folder: Path, names: Iterable[str]) -> bool:
    """Delete the files called ``names`` in ``folder``, then the folder if nothing else is left in it.
    Returns whether the folder is gone; anything amer did not put there keeps it in place."""
    for name in names:
        (folder / name).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        return False
    return True
