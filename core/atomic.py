"""Atomic file writes: readers see the old content or the new, never a part (a killed run
leaves no half-written file that later loads)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


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
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # remove the partial file, then let the error go on
        raise
