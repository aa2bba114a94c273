"""The public progress helper (lvlmva.progress, RunContext.progress_bar): nothing drawn when
progress is off, the advances counted and drawn when on, nested loops as rows of one display;
the built-in loops (training, alignment, MedMNIST-C's corruptions) draw through it."""

from __future__ import annotations

import io
import json
from contextlib import contextmanager

import pytest
import torch
from rich.console import Console
from torch import nn

import lvlmva.progress as progress_module
from lvlmva.progress import ProgressBar, progress_bar
from lvlmva.records import AlignmentSet, Split, SpuriousDataset
from lvlmva.settings import TrainOptions
from lvlmva.training import AlignmentOptions, AlignmentTrainer, Trainer


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=100, color_system=None), out


def test_disabled_draws_nothing_and_still_counts(capsys):
    console, out = _console()
    with progress_bar(False, "quiet", 3, console=console) as bar:
        for _ in range(3):
            bar.advance()
        bar.grow(2)
    assert out.getvalue() == ""
    assert not bar.drawn and bar.completed == 3 and bar.total == 5
    assert capsys.readouterr() == ("", "")


def test_run_context_draws_nothing_when_progress_is_off(ctx, capsys):
    assert ctx.progress is False
    with ctx.progress_bar("quiet", 4) as bar:
        bar()  # calling the handle advances, as a function passed around would
        bar.advance(3)
    assert isinstance(bar, ProgressBar) and not bar.drawn and bar.completed == 4
    assert capsys.readouterr() == ("", "")


def test_enabled_draws_and_counts_every_advance():
    console, out = _console()
    with progress_bar(True, "epochs", 5, console=console) as bar:
        for _ in range(3):
            bar.advance()
        bar.grow(1)
        bar()
    assert bar.drawn and bar.completed == 4 and bar.total == 6
    text = out.getvalue()
    assert "epochs" in text and "4/6" in text  # the last state stays on screen


def test_a_resumed_loop_starts_part_way():
    console, out = _console()
    with progress_bar(True, "resumed", 10, completed=7, console=console) as bar:
        bar.advance()
    assert bar.completed == 8 and "8/10" in out.getvalue()


def test_a_loop_inside_a_loop_is_a_row_of_the_same_display():
    console, out = _console()
    with progress_bar(True, "outer", 2, console=console) as outer:
        # a bar opened inside (without a console of its own) takes the open display
        with progress_bar(True, "inner", 3) as inner:
            inner.advance(3)
            assert inner._progress is outer._progress
            assert len(outer._progress.tasks) == 2
        assert len(outer._progress.tasks) == 1  # the inner row is gone with its loop
        outer.advance(2)
    assert progress_module._open == []
    assert inner.completed == 3 and outer.completed == 2


# -- the built-ins draw through it ------------------------------------------------------------------


class _Recorder:
    """Stands in for lvlmva.progress.progress_bar: records every bar and its final count."""

    def __init__(self) -> None:
        self.bars: list[tuple[str, int | None, ProgressBar, bool]] = []

    @contextmanager
    def __call__(self, enabled, description, total, *, completed=0, transient=False, console=None):
        bar = ProgressBar(total, completed)
        yield bar
        self.bars.append((description, total, bar, enabled))


@pytest.fixture
def recorder(monkeypatch) -> _Recorder:
    rec = _Recorder()
    monkeypatch.setattr(progress_module, "progress_bar", rec)
    return rec


def _blobs(n: int = 40) -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(images=torch.randn(n, 1, 4, 4, generator=g), labels=torch.arange(n) % 2)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 2))


def test_training_draws_one_bar_advanced_once_per_step(ctx, recorder):
    ctx.progress = True
    Trainer(_model, TrainOptions(epochs=3, batch_size=16, lr=1e-2), ctx).fit(_blobs(), _model(), tag="train")
    [(description, total, bar, enabled)] = recorder.bars
    assert description == "train" and enabled is True
    assert total == 3 * 3 and bar.completed == total  # 40 samples in batches of 16: 3 steps


def test_alignment_draws_one_bar_advanced_once_per_step(ctx, recorder):
    ctx.progress = True
    train = _blobs()
    data = SpuriousDataset(train=train, val=None, test=train, class_names=("a", "b"), class_descriptions=("a", "b"),
                           family="test")  # fmt: skip
    alignment = AlignmentSet(torch.tensor([0, 1, 2, 3]), torch.zeros(4), "random")
    masks = torch.zeros(4, 4, 4, dtype=torch.bool)
    opts = AlignmentOptions(epochs=2, lr=1e-3, alignment_batch=2, ordinary_batch=16)
    trainer = AlignmentTrainer(opts, ctx, seed_name="t", who="test-aligner")

    def loss(model, inputs, targets, batch_masks):
        return {"loss": nn.functional.cross_entropy(model(inputs), targets)}

    trainer.align(_model(), data, alignment, masks, loss)
    [(description, total, bar, _)] = recorder.bars
    assert description.startswith("align (test-aligner")
    assert total == 2 * 3 and bar.completed == total
    assert json.loads((ctx.run_dir / "metrics.jsonl").read_text().splitlines()[0])["steps"] == 3


def test_medmnist_c_draws_one_bar_over_corruptions_and_severities(ctx, recorder, monkeypatch):
    """With a stand-in corruption registry (medmnistc itself is not needed): a corruption that
    fails still completes its share of the bar."""
    import numpy as np

    from lvlmva.plugins.evaluators import medmnist_c

    class Works:
        def apply(self, image, severity):
            return np.asarray(image)

    class Breaks:
        def apply(self, image, severity):
            if severity >= 1:
                raise RuntimeError("numpy 2")
            return np.asarray(image)

    monkeypatch.setattr(medmnist_c, "_registry", lambda: {"dermamnist": {"works": Works(), "breaks": Breaks()}})
    ctx.progress = True
    images = torch.randint(0, 256, (6, 3, 8, 8)).float()
    split = Split(images=images, labels=torch.arange(6) % 2)
    data = SpuriousDataset(train=split, test=split, class_names=("a", "b"), class_descriptions=("a", "b"),
                           family="skin", input_scale="0-255")  # fmt: skip
    evaluator = medmnist_c.MedmnistCEvaluator(medmnist_c.MedmnistCOptions(severities=[1, 2, 3], samples=4))
    out = evaluator.evaluate(nn.Sequential(nn.Flatten(), nn.Linear(192, 2)), data, ctx)
    assert "drop.breaks" in out["not_computed"]
    [(description, total, bar, _)] = recorder.bars
    assert description == "medmnist-c corruptions" and total == 2 * 3 and bar.completed == total
