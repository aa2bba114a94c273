"""Settings as a stage's fingerprint sees them: options marked ``fingerprint=False`` left
out, files marked ``fingerprint="content"`` by their content, data paths marked
``fingerprint="listing"`` by their file list, sizes and modification times."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from .errors import ConfigurationError
from .rundir import sha256_file

__all__ = ["section_for_fingerprint"]


def section_for_fingerprint(model: type, value: dict[str, Any]) -> dict[str, Any]:
    """A settings section (its values, of Options ``model``) as fingerprints hash it: options
    that change how, not what (batch sizes for inference, concurrency, where data is read from)
    left out; a file by its content; a user's data folder by its listing, so that an added,
    removed or edited file makes every stage recompute."""
    out = {}
    for name, item in value.items():
        spec = model.model_fields.get(name)
        extra = spec.json_schema_extra if spec is not None and isinstance(spec.json_schema_extra, dict) else {}
        marker = extra.get("fingerprint", True)
        if marker is False:
            continue
        if marker == "content" and item:
            item = {"path": item, "sha256": _content_sha256(Path(item))}
        elif marker == "listing" and item:
            item = {"path": item, "listing": _listing_sha256(Path(item))}
        out[name] = item
    return out


def _content_sha256(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}") from None


def _listing_sha256(path: Path) -> str:
    """A cheap signature of a data path: for a folder, every file's relative path, size and
    modification time; for a file, its size and modification time; ``"missing"`` when there is
    nothing (the provider then says what is missing, with exit 2, when it loads)."""
    entries = []
    try:
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                st = file.stat()
                entries.append(f"{file.relative_to(path).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}")
        elif path.exists():
            st = path.stat()
            entries.append(f"\t{st.st_size}\t{st.st_mtime_ns}")
        else:
            return "missing"
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}") from None
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


