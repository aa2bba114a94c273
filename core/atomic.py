"""Writes into folders lvlmva owns: atomic (readers see the old content or the new, never a
part: a killed run leaves no half-written file that later loads), never through a symbolic link
(a link planted in a run directory must not let lvlmva truncate or append to the file it points
at), and with a message that names the file and says when the disk is full."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from pathlib import Path
from typing import IO

__all__ = ["write_atomic", "append_line", "open_lock_file", "DiskFull", "SymlinkRefused", "write_error", "refuse_symlink"]

#: errno values that mean the device has no room left (a full disk, a user's quota)
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


class SymlinkRefused(OSError):
    """A file or folder lvlmva would write is a symbolic link: refused, naming it."""


class DiskFull(OSError):
    """A write failed because the device holding the file has no space left."""


def refuse_symlink(path: Path) -> None:
    """Raise :class:`SymlinkRefused` when ``path`` is a symbolic link."""
    if os.path.islink(path):
        raise SymlinkRefused(
            errno.ELOOP,
            f"{path} is a symbolic link; lvlmva does not write through links in the folders it owns "
            "(remove the link, or pick another folder)",
            str(path),
        )


def _free_bytes(path: Path) -> int | None:
    for folder in (Path(path), *Path(path).parents):
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return None


def write_error(path: Path, exc: BaseException) -> OSError:
    """An OSError that names ``path`` and says when the device is full: ENOSPC, a quota
    (EDQUOT), or a writer that reports a failed write otherwise (torch.save's
    ``RuntimeError``) while almost no space is left. It keeps ``exc`` as its cause and
    traceback, so the traceback file still shows where the write failed."""
    if isinstance(exc, (DiskFull, SymlinkRefused)):
        return exc
    code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    free = _free_bytes(Path(path).parent) if code in _NO_SPACE or isinstance(exc, RuntimeError) else None
    if code == errno.EDQUOT:
        new: OSError = DiskFull(errno.EDQUOT, f"cannot write {path}: your disk quota is exceeded; free some space and run again", str(path))
    elif code == errno.ENOSPC or (isinstance(exc, RuntimeError) and free is not None and free < (1 << 20)):
        left = f"{free} bytes left" if free is not None else "no space left"
        new = DiskFull(errno.ENOSPC, f"cannot write {path}: the disk is full ({left} on its device); free some space and run again", str(path))
    else:
        what = getattr(exc, "strerror", None) or f"{type(exc).__name__}: {exc}"
        new = OSError(code or errno.EIO, f"cannot write {path}: {what}", str(path))
    new.__cause__ = exc
    new.__traceback__ = exc.__traceback__
    return new


def _create_temporary(folder: Path, name: str) -> tuple[int, Path]:
    """A new file next to the target, opened for writing. Created with mode 0666 so that the
    user's umask decides its permissions, as for any file a plain open() makes (mkstemp would
    always give 0600)."""
    for _ in range(100):
        tmp = folder / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file next to {folder / name}")


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename (a
    link at ``path`` is replaced, never written through). A failed write raises an OSError
    naming ``path`` (:class:`DiskFull` when the disk is full) and leaves no temporary file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temporary(path.parent, path.name)
    except OSError as exc:
        raise write_error(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)  # remove the partial file, then let the error go on
        raise


def append_line(path: Path, line: str) -> None:
    """Append one line to ``path`` (created if missing), never through a symbolic link; a
    failed write names ``path`` (and a full disk)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            refuse_symlink(path)
        raise write_error(path, exc) from exc
    try:
        with os.fdopen(fd, "a", encoding="utf-8") as fh:
            fh.write(line if line.endswith("\n") else line + "\n")
    except OSError as exc:
        raise write_error(path, exc) from exc


def open_lock_file(path: Path) -> IO[bytes]:
    """Open (create) a lock file for ``flock`` without truncating it and never through a
    symbolic link (``open(path, "w")`` would empty the file a planted link points at)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            refuse_symlink(path)
        raise
    return os.fdopen(fd, "r+b")
