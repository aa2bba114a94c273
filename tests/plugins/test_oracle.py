"""Tests of the oracle critic: exact verdicts and text on synthetic cluster maps."""

from __future__ import annotations

import pydantic
import pytest
import torch

from lvlmva.plugins.critics.oracle import OracleCritic
from lvlmva.plugins.judges.rules import RulesJudge
from lvlmva.protocols import Critic, check_capabilities
from lvlmva.records import CritiqueRequest, RenderedSample

COLORS = ("red", "blue", "green", "yellow")


def _request(cluster_map, true_mask, sample_id=0, colors=COLORS) -> CritiqueRequest:
    rendered = RenderedSample(sample_id, b"", b"", b"", colors)
    return CritiqueRequest(
        sample_id=sample_id,
        label="7",
        class_description="a seven",
        family="decoy-mnist",
        rendered=rendered,
        cluster_map=cluster_map,
        true_mask=true_mask,
    )


def _layout() -> tuple[torch.Tensor, torch.Tensor]:
    """12x12 map: red = the top-left 5x5 corner holding the 4x4 decoy (16 of 25 pixels), blue =
    the rest of the top rows with one stray true pixel (1 of 47), green = the remaining 72
    pixels, yellow = empty."""
    cmap = torch.full((12, 12), 2, dtype=torch.long)  # green
    cmap[:6, 5:] = 1  # blue, 42 pixels
    cmap[5, :5] = 1  # blue gets 5 more -> 47
    cmap[:5, :5] = 0  # red, 25 pixels
    mask = torch.zeros(12, 12, dtype=torch.bool)
    mask[:4, :4] = True  # the decoy, all in red
    mask[0, 5] = True  # one stray true pixel in blue: 1/47, about 2 %
    return cmap, mask


def test_oracle_fills_the_critic_role():
    assert check_capabilities("critic", OracleCritic) == []
    assert isinstance(OracleCritic(OracleCritic.Options()), Critic)
    assert OracleCritic.needs_true_masks
    for field in OracleCritic.Options.model_fields.values():
        assert field.description


def test_oracle_verdicts_and_text_are_exact(ctx):
    cmap, mask = _layout()
    [c] = OracleCritic(OracleCritic.Options()).critique([_request(cmap, mask, sample_id=5)], ctx)
    assert c.failure is None and c.sample_id == 5 and c.colors == COLORS
    assert c.family == "decoy-mnist" and c.label == "7" and c.model == "oracle"
    assert c.text.splitlines() == [
        "red: covers 25 pixels, 16 of them (64%) on the true spurious feature. Verdict: no",
        "blue: covers 47 pixels, 1 of them (2%) on the true spurious feature. Verdict: yes",
        "green: covers 72 pixels, none on the true spurious feature. Verdict: yes",
        "yellow: covers no pixels. Verdict: yes",
    ]


@pytest.mark.parametrize(
    ("threshold", "want"), [(0.01, [False, False, True, True]), (0.7, [True] * 4)]
)
def test_min_overlap_sets_the_threshold(ctx, threshold, want):
    cmap, mask = _layout()
    critic = OracleCritic(OracleCritic.Options(min_overlap=threshold))
    critiques = critic.critique([_request(cmap, mask)], ctx)
    [v] = RulesJudge(RulesJudge.Options()).judge(critiques, ctx)
    assert list(v.relevant) == want


def test_oracle_reports_problems_per_request_without_losing_the_others(ctx):
    cmap, mask = _layout()
    bad_labels = cmap.clone()
    bad_labels[0, 0] = 9
    out = OracleCritic(OracleCritic.Options()).critique(
        [
            _request(cmap, None, sample_id=1),
            _request(cmap, mask, sample_id=2),
            _request(cmap, mask[:5], sample_id=3),
            _request(bad_labels, mask, sample_id=4),
        ],
        ctx,
    )
    assert [c.sample_id for c in out] == [1, 2, 3, 4]
    assert out[0].text is None and "sample 1: no true spurious mask" in out[0].failure
    assert out[1].failure is None
    assert "must both be [H,W] of the same size" in out[2].failure
    assert "holds labels 0..9 but only 4 colours" in out[3].failure


def test_options_are_validated():
    with pytest.raises(pydantic.ValidationError):
        OracleCritic.Options(min_overlap=0.0)
    with pytest.raises(pydantic.ValidationError):
        OracleCritic.Options(threshold=0.5)
