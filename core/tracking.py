"""Experiment tracking: a run's settings, per-epoch records, final metrics and report, sent to
the trackers it configures (``[trackers.<name>] plugin = "mlflow"``, ``"tensorboard"``,
``"wandb"``).

:class:`TrackerSet` is what the pipeline holds: it starts every tracker when the run starts,
forwards each line a training loop logs to ``metrics.jsonl`` (the run context's one per-epoch
hook, :meth:`lvlmva.protocols.RunContext.log_jsonl`), and at the end replays the curves of the
stages reused from an earlier run, logs the final metrics and the artifacts and finishes. A
tracker never fails a run: what one raises becomes a warning on standard error and in
``tracking.json`` in the run directory, and that tracker is not called again.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from .protocols import TrackedRun

__all__ = [
    "TrackerSet",
    "TrackedRun",
    "flat_params",
    "epoch_metrics",
    "final_metrics",
    "tracked_run",
    "TRACKING_FILE",
]

#: the run directory's record of each tracker's status and warnings
TRACKING_FILE = "tracking.json"

#: keys of a per-epoch record that are not metrics (the same as the report's curves skip)
_NOT_METRICS = frozenset({"stage", "epoch", "steps", "seconds", "run_stage", "run_attempt"})

_SECRET_KEYS = {"api_key", "apikey", "token", "password", "secret", "access_token"}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def flat_params(settings: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as flat dotted keys with text values (``{"train.lr": "0.001"}``);
    registered secrets are redacted and a key that names a secret is left out."""
    from .secrets import redact_json

    out: dict[str, str] = {}
    for key, value in settings.items():
        dotted = f"{prefix}{key}"
        if str(key).lower() in _SECRET_KEYS:
            continue
        if isinstance(value, Mapping):
            out.update(flat_params(value, f"{dotted}."))
        elif value is not None:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[dotted] = redact_json(text)
    return out


def epoch_metrics(record: Mapping[str, Any]) -> tuple[dict[str, float], int] | None:
    """The metrics of one per-epoch record of ``metrics.jsonl`` and its step (the epoch), or
    ``None`` for a line that is not a per-epoch record. Names are ``<stage>/<key>``: the
    pipeline stage that logged it (``train``, ``align.rrr``, ``mitigate.jtt``), and the loop's
    own tag where it differs from the stage's role (``mitigate.jtt/jtt-first/loss``)."""
    epoch, tag = record.get("epoch"), record.get("stage")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not isinstance(tag, str):
        return None
    stage = str(record.get("run_stage") or tag)
    prefix = stage if tag in (stage, stage.partition(".")[0]) else f"{stage}/{tag}"
    metrics = {f"{prefix}/{k}": float(v) for k, v in record.items() if k not in _NOT_METRICS and _number(v)}
    return (metrics, epoch) if metrics else None


def final_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """The metrics results.json's evaluations declare (accuracy, AGA, WGA, ...), named
    ``<model>/<evaluator>/<metric>`` (a per-group table adds ``/<group>``)."""
    out: dict[str, float] = {}
    for evaluator, evaluation in (results.get("evaluations") or {}).items():
        if not isinstance(evaluation, Mapping):
            continue
        declared = {m.get("key") for m in evaluation.get("metrics") or () if isinstance(m, Mapping)}
        for model, values in (evaluation.get("models") or {}).items():
            for key, value in (values or {}).items():
                if key not in declared:
                    continue
                name = f"{model}/{evaluator}/{key}"
                if _number(value):
                    out[name] = float(value)
                elif isinstance(value, Mapping):
                    out.update({f"{name}/{k}": float(v) for k, v in value.items() if _number(v)})
    for key, value in (results.get("verdicts") or {}).items():
        if key in ("verdict_accuracy", "cluster_accuracy") and _number(value):
            out[f"verdicts/{key}"] = float(value)
    return out


def tracked_run(run_dir: Path, run_name: str, params: dict[str, str]) -> TrackedRun:
    """The tracker run of ``run_dir``: named after the run, in an experiment of its name; a
    study's cell (``<study>/cells/<data set>/seed<k>``) is ``<data set>/seed<k>`` in the
    study's experiment, with its local store in the study's folder."""
    run_dir = Path(run_dir).resolve()
    study = run_dir.parent.parent.parent
    if run_dir.parent.parent.name == "cells" and _is_study(study):
        name = f"{run_dir.parent.name}/{run_dir.name}"
        return TrackedRun(run_dir, study, name, study.name, params)
    return TrackedRun(run_dir, run_dir, run_name, run_name, params)


def _is_study(path: Path) -> bool:
    from .pipeline.rundir import MARKER

    try:
        return json.loads((path / MARKER).read_text(encoding="utf-8")).get("kind") == "study"
    except (OSError, ValueError, AttributeError):
        return False


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


class TrackerSet:
    """The run's trackers, by slot (``"trackers.mlflow"``); see the module's docstring."""

    def __init__(self, trackers: Mapping[str, Any], echo: Callable[[str], None] | None = None) -> None:
        self._trackers = dict(trackers)
        self._failed: dict[str, str] = {}
        self.warnings: list[str] = []
        self._echo = echo or (lambda message: print(message, file=sys.stderr))
        self._lock = threading.Lock()
        self._streamed: set[str] = set()  # the stages whose records reached the trackers live
        self._run: TrackedRun | None = None

    def __bool__(self) -> bool:
        return bool(self._trackers)

    def _call(self, action: str, method: str, *args: Any) -> None:
        for slot, tracker in self._trackers.items():
            if slot in self._failed:
                continue
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:  # a tracker never fails the run
                reason = f"{action}: {_describe(exc)}"
                self._failed[slot] = reason
                message = f"warning: [{slot}] tracker failed and is not called again in this run ({reason})"
                self.warnings.append(message)
                self._echo(message)

    def start(self, run: TrackedRun) -> None:
        self._run = run
        with self._lock:
            self._call("start", "start", run)

    def record(self, record: Mapping[str, Any]) -> None:
        """One line logged to ``metrics.jsonl``: a per-epoch record goes to every tracker."""
        found = epoch_metrics(record)
        if found is None or self._run is None:
            return
        with self._lock:
            self._streamed.add(str(record.get("run_stage") or record.get("stage")))
            self._call("log_metrics", "log_metrics", *found)

    def finish(self, results: Mapping[str, Any], status: str) -> None:
        """The end of the run: the curves of stages reused from an earlier run (read back from
        ``metrics.jsonl``), the final metrics, the artifacts, then ``finish``; ``tracking.json``
        records what failed."""
        run = self._run
        if run is None:
            return
        with self._lock:
            for metrics, step in self._reused_records(run.run_dir / "metrics.jsonl"):
                self._call("log_metrics (a reused stage's curve)", "log_metrics", metrics, step)
            final = final_metrics(results)
            if final:
                self._call("log_metrics (final metrics)", "log_metrics", final, None)
            for path, name in self._artifacts(run.run_dir):
                self._call(f"log_artifact {name}", "log_artifact", path, name)
            self._call("finish", "finish", status)
        self._write_record(run.run_dir)

    def _reused_records(self, path: Path) -> Iterable[tuple[dict[str, float], int]]:
        """Per-epoch records of stages not computed in this run (their curves are in
        ``metrics.jsonl`` from the run that computed them), in order."""
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict) or str(record.get("run_stage") or record.get("stage")) in self._streamed:
                continue
            found = epoch_metrics(record)
            if found is not None:
                out.append(found)
        return out

    @staticmethod
    def _artifacts(run_dir: Path) -> list[tuple[Path, str]]:
        names = ["report.md", "results.json", "settings.resolved.toml"]
        out = [(run_dir / n, n) for n in names if (run_dir / n).is_file()]
        figures = run_dir / "figures"
        if figures.is_dir():
            out += [(p, p.relative_to(run_dir).as_posix()) for p in sorted(figures.rglob("*.png")) if p.is_file()]
        return out

    def _write_record(self, run_dir: Path) -> None:
        from .atomic import write_atomic

        record = {
            slot: {"plugin": type(tracker).__name__, "status": "failed" if slot in self._failed else "ok",
                   **({"warning": self._failed[slot]} if slot in self._failed else {})}
            for slot, tracker in self._trackers.items()
        }  # fmt: skip
        try:
            write_atomic(run_dir / TRACKING_FILE, json.dumps(record, indent=2, sort_keys=True))
        except OSError as exc:
            self._echo(f"warning: cannot write {run_dir / TRACKING_FILE}: {exc.strerror or exc}")
