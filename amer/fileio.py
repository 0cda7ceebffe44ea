"""Every file amer writes is complete or absent, amer deletes only what it wrote, and never through a link.

A file is written to a hidden temporary sibling, flushed to disk, then renamed over its name; a directory
(a checkpoint) is built under a temporary name and renamed, or swapped with the one it replaces in one
step where the system allows it. Clean-up removes files by the names amer gives them, never a whole tree,
so whatever else a user put in a folder survives.

Symbolic links: the name amer writes, replaces or deletes (a file, a checkpoint folder, an exported folder)
is never followed. A link there is refused with one line (:func:`refuse_link`), and clean-up leaves a link
alone (amer never makes one, so it is not amer's to delete). Links in the directories above (a run
directory or ``--out-dir`` on symlinked scratch space) are followed: the rule is about the last name.
New files get the modes the umask gives (safetensors alone would write 0600: :func:`follow_umask`).

Reading what a user named, and the one-line form of a refused write, are :mod:`amer.fileread`.

``AMER_FAULT_AT=<point>`` kills the process at a named point (see :func:`fault_point`): the crash-safety
tests use it to stop a write half-way exactly where a power cut or ``kill -9`` could, and the preemption tests
to send SIGTERM after a given training step (``step:N``).
"""

from __future__ import annotations

import ctypes
import errno
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

from amer.errors import InputError

__all__ = [
    "FAULT_ENV",
    "append_bytes",
    "atomic_write_bytes",
    "atomic_write_text",
    "fault_point",
    "follow_umask",
    "fsync_dir",
    "json_text",
    "own_temp_files",
    "recover_dirs",
    "refuse_link",
    "remove_own_files",
    "replace_dir",
    "temp_sibling",
    "write_json",
]

FAULT_ENV = "AMER_FAULT_AT"


def fault_point(name: str) -> None:
    """Die here, as ``kill -9`` would, when ``$AMER_FAULT_AT`` names this point (a test hook; unset, a no-op).
    ``$AMER_FAULT_SIGNAL`` (e.g. ``SIGTERM``) sends that signal instead and carries on, as a scheduler's
    preemption would arrive; ``$AMER_FAULT_RANK`` limits either to the torchrun process of that rank."""
    if os.environ.get(FAULT_ENV) != name:
        return
    if os.environ.get("AMER_FAULT_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    other = os.environ.get("AMER_FAULT_SIGNAL")
    if other:
        os.kill(os.getpid(), getattr(signal, other))
        return
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


TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-\d+-\d+$")


def own_temp_files(folder: Path, is_own: Callable[[str], bool]) -> list[Path]:
    """Temporary siblings that a killed writer left behind in ``folder`` for the names ``is_own`` accepts."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if (m := TEMP_RE.match(p.name)) and is_own(m["name"]))


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def refuse_link(path: str | Path) -> None:
    """Refuse to write, replace or delete ``path`` when it is a symbolic link (the module's rule): one line
    naming the link and where it points."""
    if not os.path.islink(path):
        return
    try:
        to = os.readlink(path)
    except OSError:
        to = "?"
    dangling = "" if os.path.exists(path) else ", which does not exist"
    raise InputError(f"{path} is a symbolic link (to {to}{dangling}); amer never writes, replaces or deletes "
                     "through a link: give the real path, or remove the link")


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask can only be read by setting it, racing other threads)
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path, mode: int = 0o666) -> None:
    """Give ``path`` the mode a new file gets from the umask: a library that picks its own (safetensors writes
    0600) would otherwise leave an exported folder unreadable by the other users who should read it."""
    os.chmod(path, mode & ~_umask())


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling, fsync and ``os.replace``: complete or absent.
    ``path`` must not be a symbolic link (:func:`refuse_link`); the file's mode follows the umask."""
    path = Path(path)
    refuse_link(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fault_point(f"replace:{path.name}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def append_bytes(path: str | Path, data: bytes) -> None:
    """Append ``data`` to ``path`` in one write on an ``O_APPEND`` descriptor (a kill leaves at most a torn last
    line), never through a symbolic link."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            refuse_link(path)
        raise
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


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
    falls between the two renames); the old contents are then removed, file by file (``own_files``).
    A ``dst`` that is a symbolic link or a mount point is refused before anything moves."""
    refuse_link(dst)
    if os.path.ismount(dst):
        raise InputError(f"{dst} is a mount point: amer replaces a folder by renaming a complete new one over it, "
                         "which a mount point does not allow; write to a new folder inside it")
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
        if p.is_symlink() or not p.is_dir():  # amer never makes a link: not its to move or empty
            continue
        m = TEMP_RE.match(p.name)
        assert m is not None
        if m["kind"] == "old" and not (folder / m["name"]).exists():
            os.rename(p, folder / m["name"])
        else:
            remove_own_files(p, own)


def remove_own_files(folder: Path, names: Iterable[str]) -> bool:
    """Delete the files called ``names`` in ``folder``, then the folder if nothing else is left in it.
    Returns whether the folder is gone; anything amer did not put there keeps it in place. A link (the folder
    itself or one of the names) is not amer's: nothing is deleted through it, and it is left in place."""
    if folder.is_symlink():
        return False
    for name in names:
        if not (folder / name).is_symlink():
            (folder / name).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        return False
    return True
