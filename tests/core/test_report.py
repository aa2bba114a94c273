"""Tests of lvlmva.report.write_report on small fake results."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from lvlmva.protocols import Metric
from lvlmva.records import Critique, Verdicts
from lvlmva.rendering import render_samples
from lvlmva.report import read_training_curves, write_report
from lvlmva.settings import RenderOptions, ReportOptions

METRICS = [
    Metric("accuracy", "Accuracy").to_dict(),
    Metric("aga", "AGA", description="mean of the group accuracies").to_dict(),
    Metric("wga", "WGA").to_dict(),
    Metric("alignment_score", "Alignment score").to_dict(),
    Metric("test_samples", "Samples", higher_is_better=None, format="d", summary=False).to_dict(),
    Metric("group_accuracy", "Accuracy per group", summary=False).to_dict(),
    Metric("loss", "Loss", higher_is_better=False).to_dict(),
]

RESULTS = {
    "models": {
        "original": {"label": "original", "stage": "train"},
        "aligned": {"label": "aligned (oracle critic)", "stage": "align"},
        "true_mask": {"label": "true-mask reference", "stage": "reference"},
    },
    "evaluations": {
        "groups": {
            "plugin": "standard",
            "split": "test",
            "metrics": METRICS,
            "models": {
                "aligned": {"accuracy": 0.9123, "aga": 0.9012, "wga": 0.8345, "alignment_score": 0.9511, "test_samples": 100},
                "original": {
                    "accuracy": 0.5512,
                    "aga": 0.5234,
                    "wga": 0.1056,
                    "alignment_score": 0.3120,
                    "test_samples": 100,
                    "group_accuracy": {"decoy-match": 0.9876, "decoy-mismatch": 0.1056},
                },
                "true_mask": {"accuracy": 0.9601, "aga": 0.9555, "wga": 0.9333, "alignment_score": None, "test_samples": 100},
            },
        }
    },
    "critic": {"label": "oracle critic", "reads_true_masks": True},
    "machine": {"platform": "Linux-test", "processor": "x86_64", "device": "cpu", "torch_threads": 2},
    "verdicts": {
        "verdict_accuracy": 0.8750,
        "cluster_accuracy": 0.9375,
        "confusion": {"tp": 7, "fp": 1, "tn": 23, "fn": 1},
        "failed": 1,
    },
    "alignment": {
        "samples": 3,
        "failed": 1,
        "failures": [{"sample_id": 12, "stage": "judge", "reason": "colour 'grey': not discussed"}],
    },
    "usage": {
        "prompt_tokens": 1234,
        "completion_tokens": 567,
        "cost_usd": 0.0421,
        "requests": 3,
        "cache_hits": 1,
    },
    "timings": {"train": 12.5, "critic": 3.5},
}


def _run_pieces(run_dir):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 1, 8, 8, generator=g)
    labels = torch.randint(0, 3, (3, 8, 8), generator=g)
    rendered = render_samples(
        images, labels, [10, 11, 12], RenderOptions(size=28), 3, run_dir / "render", "render"
    )
    colors = rendered[0].colors
    verdicts = [
        Verdicts(10, colors, (False, True, True)),
        Verdicts(11, colors, (True, True, False)),
        Verdicts(12, colors, None, failure="rules judge, sample 12: colour 'grey': not discussed"),
    ]
    critiques = [
        Critique(i, colors, f"red: sample {i} text. Verdict: no\n" * 3, model="oracle")
        for i in (10, 11, 12)
    ]
    test_images = torch.rand(4, 1, 8, 8, generator=g)
    attributions = {k: torch.randn(4, 1, 8, 8, generator=g) for k in ("original", "aligned")}
    with open(run_dir / "metrics.jsonl", "w", encoding="utf-8") as fh:
        for tag in ("train", "align"):
            for e in range(3):
                fh.write(
                    json.dumps(
                        {
                            "stage": tag,
                            "epoch": e,
                            "loss": 1 / (e + 1),
                            "train_accuracy": 0.5 + e / 10,
                        }
                    )
                    + "\n"
                )
        fh.write(json.dumps({"stage": "evaluate", "accuracy": 0.5}) + "\n")
    return rendered, verdicts, critiques, test_images, attributions


def _open_png(path):
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG" and im.width > 100 and im.height > 100


def test_full_report(tmp_path):
    rendered, verdicts, critiques, test_images, attributions = _run_pieces(tmp_path)
    path = write_report(
        tmp_path,
        RESULTS,
        options=ReportOptions(samples=2, test_images=3),
        rendered=rendered,
        verdicts=verdicts,
        critiques=critiques,
        test_images=test_images,
        test_labels=torch.tensor([0, 1, 2, 3]),
        attributions=attributions,
        class_names=["zero", "one", "two", "three"],
    )
    assert path == tmp_path / "report.md"
    text = path.read_text(encoding="utf-8")
    # the model table from the declarations: titles with their direction, the declared format,
    # rows labelled and in the run's order; a column nobody has a value for is left out
    assert "Evaluator `groups` (standard), on the test split:" in text
    assert "| Model | Accuracy ↑ | AGA ↑ | WGA ↑ | Alignment score ↑ | Samples |" in text
    assert "| original | 0.5512 | 0.5234 | 0.1056 | 0.3120 | 100 |" in text
    assert "| aligned (oracle critic) | 0.9123 | 0.9012 | 0.8345 | 0.9511 | 100 |" in text
    assert "| true-mask reference | 0.9601 | 0.9555 | 0.9333 | – | 100 |" in text
    assert "| Loss" not in text and "Loss ↓" not in text
    assert (
        text.index("| original |") < text.index("| aligned (oracle critic) |") < text.index("| true-mask reference |")
    )
    assert "AGA = mean of the group accuracies." in text
    assert "Accuracy per group:" in text and "| Model | decoy-match | decoy-mismatch |" in text
    assert "| original | 0.9876 | 0.1056 |" in text
    assert "Computed on Linux-test (x86_64), device cpu, 2 torch threads" in text
    assert "Verdicts from the oracle critic (it reads the true masks: an upper-bound stand-in" in text
    # verdicts, failures, usage, timings
    assert "| verdict_accuracy | 0.8750 |" in text
    assert "| truly spurious | 7 | 1 |" in text and "| truly relevant | 1 | 23 |" in text
    assert "2 of 3 samples got valid verdicts." in text
    assert "failed (left out of alignment): 1" in text and "colour 'grey': not discussed" in text
    assert "| cost (USD) | 0.0421 |" in text and "| prompt tokens | 1234 |" in text
    assert "| critic | 3.5 |" in text
    assert "| total | 16.0 |" in text
    # figures exist, open, and are linked
    for name in ("alignment_samples", "attributions", "training_curves"):
        assert f"(figures/{name}.png)" in text
        _open_png(tmp_path / "figures" / f"{name}.png")
    assert "The first 2 of 3 alignment samples" in text
    assert "(train, align)" in text
    # critiques with verdicts; no temporary files left behind
    assert "### Sample 10 (oracle)" in text and "Verdicts: no: red; yes: blue, green." in text
    assert "Verdicts: verdicts failed (rules judge, sample 12" in text
    assert not list(tmp_path.rglob("*.tmp"))


def test_report_without_critic_or_figures(tmp_path):
    results = {
        "models": {"original": {"label": "original", "stage": "train"}},
        "evaluations": {
            "accuracy": {
                "plugin": "accuracy",
                "metrics": [Metric("accuracy", "Accuracy").to_dict()],
                "models": {"original": {"accuracy": 0.5}},
            }
        },
        "alignment": {"samples": 4, "failed": 0, "failures": []},
    }
    path = write_report(
        tmp_path,
        results,
        options=ReportOptions(),
        rendered=[],
        verdicts=[],
        critiques=[],
        test_images=None,
        test_labels=None,
        attributions={},
        class_names=["a", "b"],
    )
    text = path.read_text(encoding="utf-8")
    assert "No verdicts: this run had no critic and judge" in text
    assert "No critiques: this run had no critic." in text
    assert "No LVLM usage recorded." in text
    assert "No test attributions were computed" in text
    assert "No per-epoch training records" in text
    assert "Evaluator `accuracy`, on the test split:" in text and "| original | 0.5000 |" in text
    assert not (tmp_path / "figures").exists()


def test_unreadable_metrics_lines_are_reported(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"stage": "train", "epoch": 0, "loss": 1.0}\n{broken\n'
    )
    path = write_report(
        tmp_path,
        {},
        options=ReportOptions(),
        rendered=[],
        verdicts=[],
        critiques=[],
        test_images=None,
        test_labels=None,
        attributions={},
        class_names=[],
    )
    text = path.read_text(encoding="utf-8")
    assert "metrics.jsonl line 2 is not JSON" in text
    assert "No model was evaluated" in text
    _open_png(tmp_path / "figures" / "training_curves.png")


def test_attribution_shape_mismatch_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="attributions of 'original'"):
        write_report(
            tmp_path,
            {},
            options=ReportOptions(),
            rendered=[],
            verdicts=[],
            critiques=[],
            test_images=torch.rand(2, 1, 8, 8),
            test_labels=None,
            attributions={"original": torch.rand(2, 1, 4, 4)},
            class_names=[],
        )
    assert not (tmp_path / "report.md").exists()


def test_disabled_report_writes_nothing(tmp_path):
    path = write_report(
        tmp_path,
        RESULTS,
        options=ReportOptions(enabled=False),
        rendered=[],
        verdicts=[],
        critiques=[],
        test_images=None,
        test_labels=None,
        attributions={},
        class_names=[],
    )
    assert path == tmp_path / "report.md" and not path.exists()


@pytest.mark.parametrize("key", ["truth_min_pixels", "min_overlap"])  # min_overlap: an older results.json
def test_the_truths_pixel_count_is_named_for_what_it_is(tmp_path, key):
    results = {"critic": RESULTS["critic"], "verdicts": {**RESULTS["verdicts"], key: 1}}
    path = write_report(
        tmp_path, results, options=ReportOptions(samples=0, test_images=0), rendered=[], verdicts=[],
        critiques=[], test_images=None, test_labels=None, attributions={}, class_names=[],
    )  # fmt: skip
    text = path.read_text(encoding="utf-8")
    assert "| truth_min_pixels | 1 |" in text
    assert "truly spurious (its right verdict is \"no\") when at least 1 of its pixels lie on the true mask" in text
    # the critic option min_overlap (a share) is another setting: the table does not use its name
    assert "| min_overlap |" not in text


def _write_lines(path, records):
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records), encoding="utf-8")


def _empty_report(run_dir):
    return write_report(
        run_dir, {}, options=ReportOptions(), rendered=[], verdicts=[], critiques=[],
        test_images=None, test_labels=None, attributions={}, class_names=[],
    ).read_text(encoding="utf-8")  # fmt: skip


def test_training_curves_show_the_aligners_named_loss_terms_per_grid_point(tmp_path):
    """A run's metrics.jsonl as the trainer, a mitigator with two fits and an RRR lam grid (in
    the align and the reference stage) write it: one curve per fit, the grid's points told
    apart by the keys they share with the select lines, the loss terms as the aligner named
    them."""
    records = [{"run_stage": "train", "stage": "train", "epoch": e, "loss": 1.0 / e, "train_accuracy": 0.5, "seconds": 1.0} for e in (1, 2)]
    for stage in ("align", "reference"):
        for lam in (1.0, 10.0):
            for e in (1, 2):
                ce, penalty = 0.5 / e, 0.01 * lam / e
                records.append({"run_stage": stage, "stage": "align", "epoch": e, "lam": lam, "loss": ce + lam * penalty, "ce": ce, "penalty": penalty, "steps": 3, "seconds": 0.1})
            records.append({"run_stage": stage, "stage": "align-select", "lam": lam, "val_accuracy": 0.9, "val_wga": None, "val_aga": None})
    for tag in ("jtt-stage1", "jtt-T1-up20"):
        records.append({"run_stage": "mitigate.jtt", "stage": tag, "epoch": 1, "loss": 0.3, "train_accuracy": 0.9, "seconds": 1.0})
    records.append({"run_stage": "evaluate.standard", "stage": "evaluate", "accuracy": 0.5})
    _write_lines(tmp_path / "metrics.jsonl", records)

    curves, notes = read_training_curves(tmp_path)
    assert notes == []
    assert [c.label for c in curves] == [
        "train", "align, lam 1", "align, lam 10", "reference, lam 1", "reference, lam 10",
        "mitigate.jtt (jtt-stage1)", "mitigate.jtt (jtt-T1-up20)",
    ]  # fmt: skip
    by_label = {c.label: c for c in curves}
    assert by_label["train"].terms == () and by_label["train"].series["train_accuracy"] == [0.5, 0.5]
    grid_point = by_label["reference, lam 10"]
    assert (grid_point.stage, grid_point.tag, grid_point.point) == ("reference", "align", {"lam": 10.0})
    assert grid_point.terms == ("ce", "penalty")
    assert grid_point.epochs == [1, 2]
    assert grid_point.series["penalty"] == pytest.approx([0.1, 0.05])
    assert grid_point.series["loss"] == pytest.approx([0.5 + 1.0, 0.25 + 0.5])
    assert "lam" not in grid_point.series and "steps" not in grid_point.series
    text = _empty_report(tmp_path)
    assert "Loss and training accuracy per epoch (train, align, reference, mitigate.jtt)." in text
    assert "per epoch (third panel): align: ce, penalty; reference: ce, penalty." in text
    _open_png(tmp_path / "figures" / "training_curves.png")


def test_a_single_fit_aligner_and_a_run_without_loss_terms(tmp_path):
    """Without a grid an aligner's records carry no parameters (a single RRR lam): its terms
    are still its terms. A run whose loops log only loss and accuracy names no terms."""
    records = [{"run_stage": "align", "stage": "align", "epoch": e, "loss": 2.0, "ce": 1.0, "penalty": 0.1, "steps": 2, "seconds": 0.1} for e in (2, 1)]
    _write_lines(tmp_path / "metrics.jsonl", records)
    (curve,) = read_training_curves(tmp_path)[0]
    assert (curve.label, curve.point, curve.terms, curve.epochs) == ("align", {}, ("ce", "penalty"), [1, 2])
    assert "third panel): align: ce, penalty." in _empty_report(tmp_path)

    records = [{"stage": "train", "epoch": 1, "loss": 1.0, "train_accuracy": 0.5, "seconds": 1.0}]
    _write_lines(tmp_path / "metrics.jsonl", records)
    (curve,) = read_training_curves(tmp_path)[0]
    assert curve.terms == ()
    text = _empty_report(tmp_path)
    assert "Loss and training accuracy per epoch (train)." in text and "loss terms" not in text


def test_costs_of_batch_api_slots_are_named_as_batch_prices():
    from lvlmva.report import _usage_section, batch_priced

    settings = {
        "critic": {"plugin": "openai", "api": "batch"},
        "judges": {"rules": {"plugin": "rules"}, "gpt": {"plugin": "openai", "api": "batch"}},
    }
    assert batch_priced(settings) == ["critic", "judges.gpt"]
    assert batch_priced({"critic": {"plugin": "openai", "api": "chat"}}) == []
    usage = {"requests": 3, "cache_hits": 0, "prompt_tokens": 10, "completion_tokens": 5, "cost_usd": 0.01}
    text = "\n".join(_usage_section({"usage": usage, "settings": settings}))
    assert "Answers of critic, judges.gpt are priced at Batch API prices" in text
    assert "Batch API" not in "\n".join(_usage_section({"usage": usage, "settings": {"critic": {"api": "chat"}}}))
