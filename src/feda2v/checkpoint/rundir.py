"""Run-directory ownership: a run holds an exclusive lock on each output folder for its whole life,
and a fresh run refuses a folder that holds another run's results (issue 13: no run overwrites
another run's files).

The lock is ``fcntl.flock`` on ``<dir>/.feda2v-run.lock``: the kernel drops it when the process dies
(SIGKILL included), so a crash never leaves a folder locked. While held, the file names the holder's
PID; it is emptied on release, so a finished run leaves the same (empty) file behind every time.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from feda2v.errors import RunDirError
from feda2v.fsutil import ensure_dir

LOCK_NAME = ".feda2v-run.lock"


class RunDirLock:
    """Exclusive ownership of one directory (created if missing)."""

    def __init__(self, directory: str | os.PathLike, what: str):
        self.dir = Path(directory)
        self.what = what  # the config key that names it, for the error line
        self._fd: int | None = None

    def acquire(self) -> None:
        lock = self.dir / LOCK_NAME
        existed = lock.exists()
        ensure_dir(self.dir)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(
                f"{self.what}={self.dir} is in use by another feda2v run (pid {holder}); wait for it "
                f"to finish or give this run its own {self.what}") from None
        except OSError as e:
            os.close(fd)
            if not existed:
                lock.unlink(missing_ok=True)
            raise RunDirError(f"cannot lock {self.what}={self.dir}: {e.strerror or e}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


class RunDirs:
    """The locks of every output folder of one run (a folder named twice is locked once), held
    from ``__enter__`` to ``__exit__``."""

    def __init__(self, folders: dict[str, str | os.PathLike]):
        self.locks: list[RunDirLock] = []
        seen: set[Path] = set()
        for what, folder in folders.items():
            key = Path(os.path.abspath(folder))
            if key not in seen:
                seen.add(key)
                self.locks.append(RunDirLock(folder, what))

    def __enter__(self) -> "RunDirs":
        taken = []
        try:
            for lock in self.locks:
                lock.acquire()
                taken.append(lock)
        except BaseException:
            for lock in reversed(taken):
                lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for lock in reversed(self.locks):
            lock.release()
