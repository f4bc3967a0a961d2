"""A checkpoint directory: numbered round files, a ``latest.ckpt`` pointer, pruning, resume lookup."""
from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from feda2v.checkpoint.container import temp_name, write_checkpoint
from feda2v.fsutil import fsync_dir, remove_quietly
from feda2v.errors import CheckpointError

LATEST = "latest.ckpt"
_ROUND_RE = re.compile(r"^round_(\d{6,})\.ckpt$")
_TEMP_RE = re.compile(r"^\..+\.(?:tmp|link)-(\d+)-[0-9a-f]{8}$")


def round_filename(round_: int) -> str:
    return f"round_{round_:06d}.ckpt"


class CheckpointManager:
    """Owns one checkpoint directory.

    ``save`` writes ``round_000003.ckpt`` atomically, then points ``latest.ckpt`` at it (only once
    the round file is complete), then prunes to ``keep_last`` round files. ``latest.ckpt`` is a hard
    link (a copy where links are unsupported), so pruning never breaks it and any reader, MLflow
    and DVC see a plain file.
    """

    def __init__(self, directory: str | os.PathLike, keep_last: int = 3):
        if type(keep_last) is not int or keep_last < 1:
            raise CheckpointError(f"checkpoint.keep_last must be an integer >= 1, got {keep_last!r}")
        self.dir = Path(directory)
        self.keep_last = keep_last

    @property
    def latest_path(self) -> Path:
        return self.dir / LATEST

    def round_files(self) -> list[tuple[int, Path]]:
        if not self.dir.is_dir():
            return []
        found = []
        for p in self.dir.iterdir():
            m = _ROUND_RE.match(p.name)
            if m and p.is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def save(self, round_: int, tensors: Mapping[str, torch.Tensor], header: Mapping[str, Any]) -> Path:
        return self.save_with_header(round_, tensors, header)[0]

    def save_with_header(self, round_: int, tensors: Mapping[str, torch.Tensor],
                         header: Mapping[str, Any], *, replaces: tuple[Path, ...] = ()) -> tuple[Path, dict]:
        """``save``, also returning the full header written (with its checksums). ``replaces``:
        files of an earlier run to delete once this one is complete and ``latest`` names it."""
        if type(round_) is not int or round_ < 0:
            raise CheckpointError(f"checkpoint round must be an integer >= 0, got {round_!r}")
        if "round" in header and header["round"] != round_:
            raise CheckpointError(f"checkpoint header says round {header['round']} but it is saved as round {round_}")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot create checkpoint.dir {self.dir}: {e.strerror or e}") from None
        self._remove_orphan_temps()
        path = self.dir / round_filename(round_)
        # One directory fsync (in _point_latest) makes both renames durable: the file's data is
        # fsynced before either rename, so any crash leaves the old or the new latest, both complete.
        full = write_checkpoint(path, tensors, {**header, "round": round_}, sync_dir=False)
        self._point_latest(path)
        for old in replaces:
            if old != path and old != self.latest_path:
                old.unlink(missing_ok=True)
        self._prune(keep=path)
        return path, full

    def _point_latest(self, target: Path) -> None:
        tmp = temp_name(self.latest_path, "link")
        try:
            try:
                os.link(target, tmp)
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                # No hard links here: copy, and make the copy durable before it becomes `latest`.
                shutil.copyfile(target, tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, self.latest_path)
        except OSError as e:
            remove_quietly(tmp)
            raise CheckpointError(f"cannot update {self.latest_path}: {e.strerror or e}") from None
        finally:  # also makes the round file's own rename durable (save() leaves that to this fsync)
            fsync_dir(self.dir)

    def _prune(self, keep: Path) -> None:
        files = self.round_files()
        excess = [p for _, p in files[: max(0, len(files) - self.keep_last)] if p != keep]
        for p in excess:
            try:
                p.unlink(missing_ok=True)
            except OSError as e:
                raise CheckpointError(f"cannot prune old checkpoint {p}: {e.strerror or e}; "
                                      f"{self.latest_path} is complete") from None
        if excess:
            fsync_dir(self.dir)

    def _remove_orphan_temps(self) -> None:
        """Temp files left by a killed writer (its pid no longer runs) are garbage."""
        for p in self.dir.iterdir():
            m = _TEMP_RE.match(p.name)
            if m and not _pid_alive(int(m.group(1))):
                remove_quietly(p)  # garbage: a read-only directory may keep it

    def resolve(self, resume: str | os.PathLike) -> Path:
        """``"latest"`` -> ``<dir>/latest.ckpt``; a directory -> its ``latest.ckpt``; else the path."""
        if str(resume) == "latest":
            path = self.latest_path
            if not path.is_file():
                raise CheckpointError(
                    f"train.resume=latest but {path} does not exist; train without resume first "
                    "or pass train.resume=<path to a .ckpt file>"
                )
            return path
        path = Path(resume)
        if path.is_dir():
            path = path / LATEST
        if not path.is_file():
            raise CheckpointError(f"checkpoint to resume from not found: {path}")
        return path


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
