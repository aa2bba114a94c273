"""The run directory: what lvlmva owns on disk and how a stage's artifact gets there.

- lvlmva writes only into a folder it created (it holds the marker file ``.lvlmva-run``) or an
  empty one, which it then marks; any other folder is refused before anything is written.
- One run at a time per directory (``flock`` on ``.lock``, released by the OS if the process
  dies).
- A stage is computed in ``.partial-<stage>/`` and renamed into place when complete, with a
  record (``fingerprint.json``) of its fingerprint, its codec and the SHA-256 of every file it
  wrote. Reuse checks those hashes: a truncated or altered file is noticed and the stage
  recomputed, never loaded.
- results.json, report.md and figures/ are published from the artifacts at the end of a run and
  removed at its start, so they always belong to this run's settings.
- :func:`open_run` reads a finished run (results, stage records, artifacts) without building a
  pipeline or importing any plugin.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import SymlinkRefused, open_lock_file, refuse_symlink, write_atomic
from ..checkpoints import CHECKPOINTS, FINGERPRINT_FILE
from ..registry import PluginError, PluginRegistry, get_registry
from ..secrets import redact_json
from ..version import __version__
from .codecs import ArtifactError, Codec, DecodeContext, find_codec, json_default
from .errors import NotARunDirectory, PublishError, RunDirectoryBusy

__all__ = ["RunDirectory", "StageRecord", "FinishedRun", "open_run", "MARKER", "RECORD"]

#: the file that makes a folder a run directory of lvlmva's
MARKER = ".lvlmva-run"
#: a finished stage's record, inside its folder
RECORD = "fingerprint.json"
#: what a run publishes at the top of its directory
PUBLISHED_FILES = ("results.json", "report.md")
PUBLISHED_DIRS = ("figures",)
#: where failed stages leave their tracebacks (``logs/<stage>.error.txt``)
LOGS = "logs"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file in ``folder`` except the record itself."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel != RECORD:
            out[rel] = sha256_file(path)
    return out


def _content(files: dict[str, str]) -> str:
    blob = json.dumps(files, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class StageRecord:
    """What a finished stage left: its fingerprint, codec, files with their hashes, and the
    ``content`` hash over them (what later stages' fingerprints take from it)."""

    stage: str
    fingerprint: str
    codec: str
    files: dict[str, str]
    content: str
    seconds: float
    version: str

    def to_json(self) -> str:
        return json.dumps(
            {
                "stage": self.stage,
                "fingerprint": self.fingerprint,
                "codec": self.codec,
                "files": self.files,
                "content": self.content,
                "seconds": self.seconds,
                "lvlmva": self.version,
            },
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def read(cls, path: Path) -> StageRecord | None:
        """The record at ``path``; ``None`` when it is absent or unreadable (the stage is then
        simply not finished)."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                stage=str(data["stage"]),
                fingerprint=str(data["fingerprint"]),
                codec=str(data["codec"]),
                files={str(k): str(v) for k, v in data["files"].items()},
                content=str(data["content"]),
                seconds=float(data.get("seconds", 0.0)),
                version=str(data.get("lvlmva", "")),
            )
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            return None


def _made_by_an_earlier_version(path: Path) -> bool:
    """A folder that looks like a run directory of lvlmva 0.1 from before the marker existed
    (env.json naming lvlmva, settings.resolved.toml beside it). It is not taken over: any
    folder can hold files of those names, and a run deletes what it publishes. The refusal
    says how to adopt it."""
    try:
        env = json.loads((path / "env.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    packages = env.get("packages") if isinstance(env, dict) else None
    return isinstance(packages, dict) and bool(packages.get("lvlmva")) and (path / "settings.resolved.toml").is_file()


def _marker_kind(path: Path) -> str:
    """What a folder with our marker holds: ``"run"`` or ``"study"`` (markers written before
    the kind was recorded: a study folder is the one with cells/)."""
    try:
        kind = json.loads((path / MARKER).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind in ("run", "study"):
        return kind
    return "study" if (path / "cells").is_dir() or (path / "cells.jsonl").is_file() else "run"


#: the temporary file write_atomic makes for the marker (``.<marker>.<12 hex>.tmp``)
_MARKER_TEMP = re.compile(rf"^\.{re.escape(MARKER)}\.[0-9a-f]{{12}}\.tmp$")


def _check_ours(path: Path, kind: str = "run") -> bool:
    """True when ``path`` is a folder of ours of this ``kind`` (a run directory or a study
    directory), False when it does not exist or is an empty folder (ours to take); raises
    :class:`NotARunDirectory` for anything else, a folder of the other kind included (a run
    would unpublish a study's results.json, a study would overwrite a run's)."""
    if not path.exists():
        if path.is_symlink():
            raise NotARunDirectory(f"{path} is a broken symbolic link; pick another --out")
        return False
    if not path.is_dir():
        raise NotARunDirectory(f"{path} exists and is not a folder; pick another --out")
    if (path / MARKER).is_file():
        found = _marker_kind(path)
        if found != kind:
            raise NotARunDirectory(f"{path} is an lvlmva {found} directory, not a {kind} directory; pick another folder")
        return True
    if kind == "run" and _made_by_an_earlier_version(path):
        raise NotARunDirectory(
            f"{path} looks like a run directory of an older lvlmva (env.json and settings.resolved.toml) "
            f"but has no {MARKER} file, so nothing was touched: a run there would delete its report.md, "
            f"figures/ and results.json. If it is one of lvlmva's, adopt it with: "
            f"echo '{{\"kind\": \"run\"}}' > {shlex.quote(str(path / MARKER))}   (its stages are then checked and "
            "recomputed where they differ); otherwise pick another --out"
        )
    try:
        with os.scandir(path) as entries:
            # a claim killed while writing the marker leaves only the marker's temporary file:
            # the folder is still ours to take (claim removes it)
            empty = all(_MARKER_TEMP.match(e.name) for e in entries)
    except OSError as exc:
        raise NotARunDirectory(f"cannot read {path}: {exc.strerror or exc}") from None
    if not empty:
        raise NotARunDirectory(
            f"{path} exists, is not empty and is not an lvlmva run directory (it has no {MARKER} "
            "file): lvlmva writes only into folders it created or empty ones, so nothing was "
            "touched; pick another --out (or run.out_dir / run.name)"
        )
    return False


class RunDirectory:
    """A claimed run directory. :meth:`claim` is the only way to get one."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    # -- claiming and locking --------------------------------------------------------------
    @staticmethod
    def check(path: Path, kind: str = "run") -> None:
        """What :meth:`claim` would refuse, without creating anything (``--dry-run``,
        ``validate``)."""
        path = Path(path)
        if not _check_ours(path, kind):
            parent = next((p for p in [path, *path.parents] if p.exists()), None)
            if parent is not None and not parent.is_dir():
                raise NotARunDirectory(f"cannot create {path}: {parent} is a file")
            if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
                raise NotARunDirectory(f"cannot create {path}: {parent} is not writable")

    @classmethod
    def claim(cls, path: Path, kind: str = "run") -> RunDirectory:
        """Take ``path`` as a run directory (or, with ``kind="study"``, a study directory):
        create it (with its parents) or mark an empty folder; refuse a folder that is not ours,
        or ours of the other kind, with :class:`NotARunDirectory`."""
        path = Path(path)
        if not _check_ours(path, kind) or not (path / MARKER).is_file():
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise NotARunDirectory(f"cannot create run directory {path}: {exc.strerror or exc}") from None
            for leftover in path.iterdir():  # an earlier claim's marker, cut short
                if _MARKER_TEMP.match(leftover.name):
                    leftover.unlink(missing_ok=True)
            marker = {"lvlmva": __version__, "kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            try:
                write_atomic(path / MARKER, json.dumps(marker) + "\n")
            except OSError as exc:
                raise NotARunDirectory(f"cannot write into {path}: {exc.strerror or exc}") from None
        return cls(path)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run directory for this process; :class:`RunDirectoryBusy` if another has it."""
        import fcntl

        self.refuse_links()
        try:
            fh = open_lock_file(self.path / ".lock")
        except SymlinkRefused as exc:
            raise NotARunDirectory(str(exc.strerror)) from None
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunDirectoryBusy(f"{self.path} is in use by another lvlmva run; wait for it or use --out") from None
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        finally:
            fh.close()

    def refuse_links(self) -> None:
        """:class:`NotARunDirectory` (exit 2, before anything is written) when a symbolic link
        stands where lvlmva writes: at the top of the run directory, or inside ``logs/`` and
        ``review/``. A link there would let a run truncate, append to or delete a file
        elsewhere (``.lock``, ``metrics.jsonl``, ``figures/``)."""
        folders = [self.path, self.path / LOGS, self.path / "review"]
        for folder in folders:
            try:
                refuse_symlink(folder)
                if not folder.is_dir():
                    continue
                with os.scandir(folder) as entries:
                    links = sorted(e.name for e in entries if e.is_symlink())
            except SymlinkRefused as exc:
                raise NotARunDirectory(str(exc.strerror)) from None
            except OSError as exc:
                raise NotARunDirectory(f"cannot read {folder}: {exc.strerror or exc}") from None
            if links:
                shown = ", ".join(str(folder / name) for name in links)
                raise NotARunDirectory(
                    f"{shown}: symbolic link{'s' if len(links) > 1 else ''} in a run directory; lvlmva does not "
                    "write through links in the folders it owns, so nothing was touched (remove the link, or pick another --out)"
                )

    # -- logs --------------------------------------------------------------------------------
    def write_log(self, name: str, text: str) -> Path:
        """Write ``logs/<name>`` (a failed stage's traceback) and return its path."""
        path = self.path / LOGS / name
        write_atomic(path, text)
        return path

    def remove_log(self, name: str) -> None:
        (self.path / LOGS / name).unlink(missing_ok=True)

    # -- stages ------------------------------------------------------------------------------
    def stage_dir(self, stage: str) -> Path:
        return self.path / stage

    def record(self, stage: str) -> StageRecord | None:
        """The record of a finished stage, or ``None``."""
        record = StageRecord.read(self.stage_dir(stage) / RECORD)
        return record if record is not None and record.stage == stage else None

    def verify(self, record: StageRecord) -> str | None:
        """``None`` when every file of the stage is as it was written; else what is wrong,
        naming the file (relative to the run directory)."""
        folder = self.stage_dir(record.stage)
        for rel, digest in record.files.items():
            path = folder / rel
            shown = f"{record.stage}/{rel}"
            try:
                actual = sha256_file(path)
            except FileNotFoundError:
                return f"{shown} is missing"
            except OSError as exc:
                return f"{shown} cannot be read ({exc.strerror or exc})"
            if actual != digest:
                return f"{shown} was changed after it was written (its SHA-256 differs from the record)"
        return None

    def begin(self, stage: str, fingerprint: str | None = None) -> Path:
        """A fresh ``.partial-<stage>/`` to compute the stage in: empty but for the checkpoints
        an interrupted computation with the same ``fingerprint`` left (``checkpoints/``, see
        :mod:`lvlmva.checkpoints`); checkpoints of another fingerprint are deleted."""
        partial = self.path / f".partial-{stage}"
        refuse_symlink(partial)
        kept = partial / CHECKPOINTS
        keep = fingerprint is not None and _read_text(kept / FINGERPRINT_FILE) == fingerprint
        if keep and partial.is_dir() and not kept.is_symlink():
            _remove_all_but_checkpoints(partial)
        else:
            shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True, exist_ok=True)
        if fingerprint is not None and not keep:
            kept.mkdir()
            write_atomic(kept / FINGERPRINT_FILE, fingerprint)
        return partial

    def abandon(self, stage: str) -> None:
        """Delete an unfinished stage's files, keeping its checkpoints for the next computation
        with the same fingerprint (a failure or an interruption need not cost the epochs done)."""
        partial = self.path / f".partial-{stage}"
        kept = partial / CHECKPOINTS
        if not kept.is_dir() or kept.is_symlink() or not any(kept.glob("*.pt")):
            shutil.rmtree(partial, ignore_errors=True)
            return
        _remove_all_but_checkpoints(partial, ignore_errors=True)  # on the way out of a failure

    def commit(self, stage: str, fingerprint: str, codec: str, seconds: float) -> StageRecord:
        """Record the files of ``.partial-<stage>/`` with their hashes and move it into place."""
        partial = self.path / f".partial-{stage}"
        shutil.rmtree(partial / CHECKPOINTS, ignore_errors=True)  # a finished stage needs none
        files = _manifest(partial)
        record = StageRecord(stage, fingerprint, codec, files, _content(files), seconds, __version__)
        write_atomic(partial / RECORD, record.to_json())
        self.install(stage)
        return record

    def install(self, stage: str) -> None:
        """Move a complete ``.partial-<stage>/`` into place (the old folder, if any, is replaced
        by renames, so a reader finds the old stage or the new one)."""
        partial = self.path / f".partial-{stage}"
        final, old = self.stage_dir(stage), self.path / f".old-{stage}"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)

    def retire(self, stage: str) -> None:
        """Make a finished stage unfinished without deleting its files (``--refresh``: the old
        answers stay on disk until a new computation replaces them, but are never reused)."""
        record = self.stage_dir(stage) / RECORD
        if record.exists():
            os.replace(record, record.with_name("fingerprint.retired.json"))

    # -- files at the top ----------------------------------------------------------------------
    def write(self, name: str, data: str | bytes) -> None:
        write_atomic(self.path / name, data)

    def forget_logs(self, stage: str, keep_attempt: str) -> None:
        """Once a new artifact of ``stage`` is committed, drop the JSON lines that earlier or
        interrupted computations of it logged (paid LVLM answers stay in the response cache)."""
        for name in ("metrics.jsonl", "transcripts.jsonl"):
            path = self.path / name
            if not path.exists():
                continue
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    if record.get("run_stage") == stage and record.get("run_attempt") != keep_attempt:
                        continue
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                kept.append(line)
            write_atomic(path, "".join(k + "\n" for k in kept))

    def unpublish(self) -> None:
        """Remove what an earlier run published: it is published again from this run's
        artifacts at its end, so a failed run never shows stale results."""
        try:
            for name in PUBLISHED_FILES:
                (self.path / name).unlink(missing_ok=True)
            for name in PUBLISHED_DIRS:
                if (self.path / name).is_dir():
                    shutil.rmtree(self.path / name)
        except OSError as exc:
            where = exc.filename or self.path
            raise PublishError(f"cannot remove the results of the run before from {self.path}: {where}: {exc.strerror or exc}") from None

    def publish(self, results: dict[str, Any], report_dir: Path | None) -> None:
        """Write results.json and copy report.md and figures/ out of ``report_dir``."""
        try:
            # a failure text that quotes a secret was redacted where it was made; this is the
            # last gate before the file a user shares
            self.write("results.json", json.dumps(redact_json(results), indent=2, default=json_default) + "\n")
            if report_dir is not None and (report_dir / "report.md").is_file():
                for name in PUBLISHED_DIRS:
                    if (report_dir / name).is_dir():
                        shutil.copytree(report_dir / name, self.path / name, dirs_exist_ok=True)
                write_atomic(self.path / "report.md", (report_dir / "report.md").read_bytes())
        except OSError as exc:
            where = exc.filename or self.path
            raise PublishError(f"cannot publish the results into {self.path}: {where}: {exc.strerror or exc}") from None


class FinishedRun:
    """A run directory read without building a pipeline: its results, settings, stage records
    and artifacts (each checked against its recorded hashes before it is read)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not (self.path / MARKER).is_file():
            raise NotARunDirectory(f"{self.path} is not an lvlmva run directory (no {MARKER})")

    def results(self) -> dict[str, Any]:
        """The published results.json (``ArtifactError`` when the run has not finished)."""
        path = self.path / "results.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ArtifactError(f"{path} is missing: the run has not finished (or failed)") from None
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"cannot read {path}: {exc}") from exc

    def settings_text(self) -> str:
        return (self.path / "settings.resolved.toml").read_text(encoding="utf-8")

    def records(self) -> dict[str, StageRecord]:
        """Stage name -> record, for every finished stage folder."""
        out = {}
        for child in sorted(self.path.iterdir()):
            if child.is_dir() and not child.name.startswith("."):
                record = StageRecord.read(child / RECORD)
                if record is not None and record.stage == child.name:
                    out[child.name] = record
        return out

    def load(self, stage: str, build_model: Any = None, registry: PluginRegistry | None = None) -> Any:
        """A finished stage's artifact. Models need ``build_model(input_shape, num_classes)``.

        A stage a plugin added may be stored with the plugin's own codec: when the record names
        a codec that is not lvlmva's (nor registered in this process), the installed plugins are
        loaded (``registry``, default :func:`lvlmva.registry.get_registry`) and the codec their
        stages brought is used."""
        rundir = RunDirectory(self.path)
        record = rundir.record(stage)
        if record is None:
            raise ArtifactError(f"{self.path / stage} holds no finished stage")
        problem = rundir.verify(record)
        if problem is not None:
            raise ArtifactError(f"{self.path}: {problem}")
        codec = self._codec(stage, record.codec, registry)
        return codec.decode(rundir.stage_dir(stage), DecodeContext(build_model))

    def _codec(self, stage: str, name: str, registry: PluginRegistry | None) -> Codec:
        codec = find_codec(name)
        if codec is not None:
            return codec
        where = f"{self.path / stage}: stage {stage!r} is stored with codec {name!r}"
        if registry is None:
            try:
                registry = get_registry()
            except PluginError as exc:
                raise ArtifactError(f"{where}, which is not lvlmva's own, and loading the installed plugins failed: {exc}") from exc
        codec = registry.codec(name)
        if codec is None:
            known = ", ".join(f"{n} ({e.distribution}, stage {e.name!r})" for n, e in registry.codec_sources().items())
            raise ArtifactError(
                f"{where}, which neither lvlmva nor an installed plugin provides "
                f"(codecs of installed plugins' stages: {known or 'none'}); "
                f"install the plugin that added stage {stage!r}"
            )
        return codec


def open_run(path: str | Path) -> FinishedRun:
    """A finished (or partly finished) run directory, read-only."""
    return FinishedRun(Path(path))


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _remove_all_but_checkpoints(partial: Path, ignore_errors: bool = False) -> None:
    """Empty an unfinished stage's folder but for its ``checkpoints/`` (links are removed, not
    followed); ``ignore_errors``: leave what cannot be removed (as ``shutil.rmtree`` does)."""
    for entry in partial.iterdir():
        if entry.name == CHECKPOINTS:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=ignore_errors)
        else:
            try:
                entry.unlink()
            except OSError:
                if not ignore_errors:
                    raise
