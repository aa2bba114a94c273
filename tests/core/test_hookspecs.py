"""The event hooks reach an observer plugin: lvlmva_stage_started, lvlmva_stage_finished and
lvlmva_run_finished, on a fresh run, a resumed run and a failing run. The run uses the example
third-party data set and the built-in MLP, so it takes well under a second."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from lvlmva import hookimpl
from lvlmva.hookspecs import PROJECT
from lvlmva.pipeline import Pipeline, StageFailed
from lvlmva.protocols import PluginOptions
from lvlmva.registry import register_module
from lvlmva.settings import load_settings


class Observer:
    """Records every event hook call in order."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    @hookimpl
    def lvlmva_stage_started(self, stage: str, run_dir: Path, fingerprint: str) -> None:
        self.calls.append(("started", stage, run_dir, fingerprint))

    @hookimpl
    def lvlmva_stage_finished(self, stage: str, run_dir: Path, status: str, seconds: float) -> None:
        self.calls.append(("finished", stage, run_dir, status, seconds))

    @hookimpl
    def lvlmva_run_finished(self, run_dir: Path, results: dict, status: str) -> None:
        self.calls.append(("run_finished", run_dir, results, status))

    def of(self, kind: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == kind]

    def statuses(self) -> dict[str, str]:
        return {c[1]: c[3] for c in self.of("finished")}


class BrokenModel:
    """A model factory that cannot build (to make the train stage fail)."""

    class Options(PluginOptions):
        pass

    def __init__(self, options) -> None:
        self.options = options

    def build(self, input_shape, num_classes):
        raise RuntimeError("cannot build this model")


@pytest.fixture
def observer(toy_registered, torch_global_state) -> Observer:
    obs = Observer()
    register_module(obs, "observer")
    return obs


def _run(settings_file: Path, run_dir: Path, overrides: tuple[str, ...] = ()) -> Pipeline:
    cache = (run_dir.parent / "cache").as_posix()
    settings = load_settings(settings_file, [f"run.cache_dir={cache!r}", *overrides], environ={})
    pipeline = Pipeline(settings, run_dir, echo=lambda _message: None)
    pipeline.run()
    return pipeline


def test_observer_hooks_are_real_hook_implementations():
    for name in ("lvlmva_stage_started", "lvlmva_stage_finished", "lvlmva_run_finished"):
        assert hasattr(getattr(Observer, name), f"{PROJECT}_impl")


def test_fresh_run_calls_every_event_hook(observer, toy_registered, tmp_path):
    run_dir = tmp_path / "run"
    pipeline = _run(toy_registered, run_dir)

    computed = {"data", "train", "evaluate.accuracy", "results", "report"}
    started = observer.of("started")
    assert {c[1] for c in started} == computed
    for _, stage, where, fingerprint in started:
        assert where == run_dir and fingerprint == pipeline.outcomes[stage].fingerprint

    statuses = observer.statuses()
    assert set(statuses) == {stage.name for stage in pipeline.stages}
    assert {s for s, status in statuses.items() if status == "computed"} == computed
    assert {s for s, status in statuses.items() if status != "computed"} == {
        stage.name for stage in pipeline.stages if stage.name not in computed
    }
    assert set(statuses.values()) == {"computed", "skipped"}
    for _, stage, _, status, seconds in observer.of("finished"):
        assert seconds >= 0 and (status == "computed" or seconds == 0)
        # a stage finishes after it started
        if status == "computed":
            assert observer.calls.index(next(c for c in started if c[1] == stage)) < observer.calls.index(
                next(c for c in observer.of("finished") if c[1] == stage)
            )

    (finished,) = observer.of("run_finished")
    assert observer.calls[-1] is finished
    _, where, results, status = finished
    assert (where, status) == (run_dir, "ok")
    scored = results["evaluations"]["accuracy"]["models"]["original"]
    assert set(scored) == {"accuracy", "samples"}
    assert scored["samples"] == 64


def test_resumed_run_reports_reused_stages_without_starting_them(observer, toy_registered, tmp_path):
    run_dir = tmp_path / "run"
    _run(toy_registered, run_dir)
    first = observer.of("run_finished")[0][2]
    observer.calls.clear()

    _run(toy_registered, run_dir)
    assert observer.of("started") == []
    statuses = observer.statuses()
    assert {s for s, status in statuses.items() if status == "reused"} == {"train", "evaluate.accuracy", "results", "report"}
    assert all(c[4] == 0.0 for c in observer.of("finished"))
    (finished,) = observer.of("run_finished")
    assert finished[3] == "ok" and finished[2] == first


def test_failing_stage_is_reported_to_observers(observer, toy_registered, tmp_path):
    broken = types.SimpleNamespace()

    @hookimpl
    def lvlmva_register(registry):
        registry.add("model", "broken", BrokenModel)

    broken.lvlmva_register = lvlmva_register
    register_module(broken, "broken-model")
    text = toy_registered.read_text()
    assert 'plugin = "mlp"\nhidden = [16]\n' in text
    settings_file = tmp_path / "broken.toml"
    settings_file.write_text(text.replace('plugin = "mlp"\nhidden = [16]\n', 'plugin = "broken"\n'))
    run_dir = tmp_path / "run"
    with pytest.raises(StageFailed, match="stage 'train' failed: RuntimeError: cannot build this model"):
        _run(settings_file, run_dir)
    failed = [c for c in observer.of("finished") if c[3] == "failed"]
    assert [c[1] for c in failed] == ["train"]
    # the data set loads first (something computes), then train starts and fails; the stages
    # that may go without it still run and publish results that name the failure
    assert [c[1] for c in observer.of("started")] == ["data", "train", "evaluate.accuracy", "results", "report"]
    assert ("started", "train", run_dir) == observer.of("started")[1][:3]
    (finished,) = observer.of("run_finished")
    assert finished[1:] == (run_dir, {}, "failed")
    published = json.loads((run_dir / "results.json").read_text())
    assert published["models"] == {} and "cannot build this model" in published["failed"]["train"]
