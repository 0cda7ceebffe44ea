"""One trainer per run directory: ``amer-run.lock``, held with an advisory ``flock`` while a run trains.

The kernel releases a ``flock`` when its holder exits in any way (a return, an exception, ``kill -9``), so a
lock is never stale after its holder died and nothing has to guess from process ids. Under torchrun rank 0
owns the run directory and takes the lock (:func:`amer.training.resolve.resolve_run` calls it there only);
the other ranks learn a refusal from it like any other. The holder writes who it is (process id, host,
start time, command line) into the file, so a refusal names the live process in one line.

The file is removed when its holder releases it. A process that opened it just before the removal and then
gets the lock checks that the name still leads to the file it locked, and starts over when it does not, so
two processes never both believe they hold it. A file system without locks (some network mounts) costs a
warning, and the run goes on unprotected.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from amer.errors import ConfigError
from amer.fileio import refuse_link
from amer.fileread import json_loads

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "RunLock", "acquire", "ensure_free", "holder"]

log = logging.getLogger(__name__)

LOCK_NAME = "amer-run.lock"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunLock:
    """A held run-directory lock; :meth:`release` (or the process ending) lets the next run in."""

    def __init__(self, path: Path, fd: int | None, made_dir: bool = False) -> None:
        self.path, self._fd, self._made_dir = path, fd, made_dir

    def release(self) -> None:
        """Let the next run in; a run directory this lock created and nothing else filled goes too (a run that
        failed before writing anything leaves no empty directory behind)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held: the next opener finds a fresh file
        except OSError:
            pass
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None
        if self._made_dir:
            try:
                self.path.parent.rmdir()
            except OSError:  # not empty: the run wrote into it
                pass

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe(info: object) -> str:
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
        return "another process"
    where = f" on {info['host']}" if info.get("host") and info["host"] != socket.gethostname() else ""
    since = f", since {info['started']}" if info.get("started") else ""
    ranks = f", rank 0 of {info['world']}" if isinstance(info.get("world"), int) and info["world"] > 1 else ""
    cmd = f": {info['command']}" if info.get("command") else ""
    return f"process {info['pid']}{where}{ranks}{since}{cmd}"


def holder(run_dir: Path) -> str:
    """Who holds ``run_dir``'s lock, as its lock file says (``"another process"`` when it says nothing)."""
    try:
        return _describe(json_loads((run_dir / LOCK_NAME).read_bytes() or b"null"))
    except (OSError, ValueError, RecursionError):
        return "another process"


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _in_use(run_dir: Path) -> ConfigError:
    return ConfigError(f"run directory {run_dir} is in use by {holder(run_dir)}; one amer train at a time per run "
                       "directory: wait for it to end or stop it (SIGTERM makes it write a checkpoint first), or "
                       "choose another --run-name")


def ensure_free(run_dir: Path) -> None:
    """Raise the in-use error when a live process holds ``run_dir``'s lock (nothing is created or changed): a
    refusal for another reason (the directory exists) then names the process that is still training there."""
    if fcntl is None or not (run_dir / LOCK_NAME).is_file():
        return
    try:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise _in_use(run_dir) from None
    finally:
        os.close(fd)


def acquire(run_dir: Path) -> RunLock:
    """Lock ``run_dir`` (created if missing) for this process. A live holder is a :class:`ConfigError` naming it;
    a holder that died left nothing that stops this call."""
    path = run_dir / LOCK_NAME
    refuse_link(path)
    if fcntl is None:  # pragma: no cover
        return RunLock(path, None)
    made_dir = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        fd = os.open(path, flags, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise _in_use(run_dir) from None
            if e.errno in _NO_LOCKS:
                log.warning(f"warning: the file system of {run_dir} does not support locks; nothing stops a second "
                            "amer train from using this run directory at the same time")
                return RunLock(path, None)
            raise
        if _same_file(fd, path):  # else its holder removed it as we opened it: start over on the new file
            break
        os.close(fd)
    world = os.environ.get("WORLD_SIZE", "1")
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:300] if sys.argv else None,
            "world": int(world) if world.isdigit() else 1}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return RunLock(path, fd, made_dir)
