"""File-system helpers for crash-safe writes (checkpoints, prepared data, reports, metrics).

Every report, metrics or plot file goes through :func:`atomic_write_bytes` /
:func:`atomic_write_text`: a reader sees the old file or the new one, never half of one, and an
OS failure (disk full, read-only mount, a file where a directory should be) becomes one
:class:`~feda2v.errors.OutputError` naming the path and the errno's meaning.
"""
from __future__ import annotations

import contextlib
import errno as _errno
import os
import sys
import tempfile
from pathlib import Path

from feda2v.errors import OutputError

# What the user can do about the common write failures (the errno's meaning comes from the OS).
_ADVICE = {
    _errno.ENOSPC: "free some space or choose another directory",
    _errno.EDQUOT: "free some space or choose another directory",
    _errno.EROFS: "the file system is read-only; choose a writable directory",
    _errno.EACCES: "check its permissions or choose another directory",
    _errno.EPERM: "check its permissions or choose another directory",
    _errno.ENOTDIR: "a part of the path is a file, not a directory; move it away or choose another path",
    _errno.EISDIR: "a directory is in the way; move it away or choose another path",
    _errno.EEXIST: "a file is in the way of a directory; move it away or choose another path",
    _errno.ENAMETOOLONG: "choose a shorter path",
}

# The process umask, read once: new files get the mode open() would give them (mkstemp's is 0600).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def os_error_message(path, exc: OSError, action: str = "write") -> str:
    """One line: what could not be done to which path, the errno's meaning, what to do."""
    reason = os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc) or type(exc).__name__)
    where = ""
    culprit = exc.filename
    if culprit is not None and str(culprit) != str(path) and not str(culprit).endswith(".tmp"):
        where = f" ({os.fsdecode(culprit)})"
    advice = _ADVICE.get(exc.errno, "check the path or choose another location")
    return f"cannot {action} {os.fsdecode(str(path))}: {reason}{where}; {advice}"


def output_error(path, exc: OSError, action: str = "write") -> OutputError:
    return OutputError(os_error_message(path, exc, action))


@contextlib.contextmanager
def writing(path, action: str = "write"):
    """Turn an OSError raised inside the block into one OutputError about ``path``."""
    try:
        yield
    except OSError as e:
        raise output_error(path, e, action) from e


def ensure_dir(directory) -> Path:
    """``mkdir -p`` whose failure (a file in the way, read-only, no space) is one OutputError."""
    directory = Path(directory)
    with writing(directory, "create directory"):
        if directory.exists() and not directory.is_dir():
            raise FileExistsError(_errno.EEXIST, os.strerror(_errno.EEXIST), str(directory))
        directory.mkdir(parents=True, exist_ok=True)
    return directory


def remove_quietly(path) -> None:
    """Best-effort removal of a temporary file. On a read-only mount even ``unlink`` of a missing
    file fails (EROFS); that must not replace the error being reported."""
    with contextlib.suppress(OSError):
        os.unlink(path)


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable. Some file systems cannot open or fsync a
    directory; the rename is still atomic there, so that is not an error."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range's dirty pages, do not wait
_sync_file_range = None


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing a just-written range to the disk without waiting (Linux
    ``sync_file_range(SYNC_FILE_RANGE_WRITE)``), so the device works while the caller computes
    and a later fsync waits only for what is still in flight. A hint, not durability (only fsync
    is): a no-op where the call does not exist, and its failure is ignored (fsync reports I/O errors)."""
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = _load_sync_file_range()
    if _sync_file_range is not False:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def _load_sync_file_range():
    """libc's sync_file_range (os has no binding for it), or False where there is none."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError, ImportError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a unique temporary name in the same directory
    (concurrent writers never share one), fsync, rename over the target, fsync the directory.
    On failure the previous file is untouched and the temporary one is removed."""
    path = Path(path)
    ensure_dir(path.parent)
    with writing(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; reports are ordinary output
            os.replace(tmp, path)
        except BaseException:
            remove_quietly(tmp)
            raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path, text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` as UTF-8."""
    # surrogateescape: a path the OS gave as undecodable bytes (argv, listdir) is written back as
    # those same bytes, not refused
    return atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"))
