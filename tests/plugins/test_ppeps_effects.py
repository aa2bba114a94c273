"""Which effect PPEPS-WGM segments (positive, negative, absolute), and how prompts say it."""

from __future__ import annotations

import hashlib

import numpy as np
import pydantic
import pytest
import torch

from lvlmva.plugins.lvlm.prompts import (
    DEFAULT_EFFECT_TEXTS,
    PLACEHOLDERS,
    TemplateError,
    load_template,
    render_critic_prompt,
)
from lvlmva.plugins.segmenters.ppeps_wgm import PpepsWgmSegmenter, effect_map, pixel_weights
from lvlmva.records import EFFECTS, CritiqueRequest, RenderedSample, Segmentation

FAMILIES = ("decoy-mnist", "knee", "skin")


def segmenter(**options) -> PpepsWgmSegmenter:
    return PpepsWgmSegmenter(PpepsWgmSegmenter.Options(**options))


def bump(size: int, centre: tuple[int, int], mass: float) -> torch.Tensor:
    """A [size, size] square bump of 3 x 3 pixels holding ``mass``."""
    out = torch.zeros(size, size)
    r, c = centre
    out[r - 1 : r + 2, c - 1 : c + 2] = mass / 9
    return out


def request(effect: str, family: str = "decoy-mnist", label: str = "7") -> CritiqueRequest:
    rendered = RenderedSample(5, b"o", b"c", b"v", ("red", "blue", "green"))
    return CritiqueRequest(
        5, label, "A bar and a slant.", family, rendered, torch.zeros(2, 2, dtype=torch.long),
        effect=effect,
    )  # fmt: skip


# -- weights ------------------------------------------------------------------------------------


def test_effect_map_matches_a_numpy_twin(rng: np.random.Generator) -> None:
    raw = rng.normal(size=(4, 3, 6, 5)).astype(np.float32)
    summed = raw.astype(np.float64).sum(axis=1).reshape(4, -1)
    twins = {
        "positive": np.maximum(summed, 0),
        "negative": np.maximum(-summed, 0),
        "absolute": np.abs(summed),
    }
    for effect, twin in twins.items():
        got = effect_map(torch.from_numpy(raw), effect)
        np.testing.assert_allclose(got.numpy(), twin, rtol=0, atol=1e-12)
        weights = pixel_weights(torch.from_numpy(raw), effect).numpy()
        np.testing.assert_allclose(weights, twin * 30 / twin.sum(1, keepdims=True), atol=1e-12)
        np.testing.assert_allclose(weights.mean(1), 1.0, atol=1e-12)


def test_default_weights_are_the_positive_part_bit_for_bit() -> None:
    # The paper's PPEPS-WGM, computed as before effects became an option: runs with the
    # default effect give the same clusters, so their stored results stay valid.
    maps = torch.randn(5, 3, 9, 8, generator=torch.Generator().manual_seed(3))
    phi = maps.to(torch.float64).sum(dim=1).flatten(1).clamp_min(0.0)
    before = phi * (72 / phi.sum(dim=1, keepdim=True))
    assert torch.equal(pixel_weights(maps), before)
    assert torch.equal(pixel_weights(maps, "positive"), before)
    assert PpepsWgmSegmenter.Options().effect == "positive"


def test_unknown_effect_is_refused() -> None:
    with pytest.raises(ValueError, match="positive, negative, absolute"):
        effect_map(torch.zeros(1, 1, 2, 2), "signed")
    with pytest.raises(pydantic.ValidationError, match="positive"):
        PpepsWgmSegmenter.Options(effect="signed")
    assert "evidence against the class" in PpepsWgmSegmenter.Options.model_fields["effect"].description


# -- segmentation ---------------------------------------------------------------------------------


def test_negative_effect_segments_the_mirrored_map(ctx) -> None:
    maps = torch.randn(4, 1, 14, 14, generator=torch.Generator().manual_seed(5))
    negative = segmenter(effect="negative", num_clusters=4).segment(maps, ctx)
    mirrored = segmenter(num_clusters=4).segment(-maps, ctx)
    assert torch.equal(negative.labels, mirrored.labels)
    assert torch.equal(negative.shares, mirrored.shares)
    assert (negative.effect, mirrored.effect) == ("negative", "positive")
    assert not torch.equal(negative.labels, segmenter(num_clusters=4).segment(maps, ctx).labels)


def test_a_negative_decoy_gets_a_cluster_only_from_negative_or_absolute_effect(ctx) -> None:
    # A digit of positive evidence (two bumps) and a dim decoy in a corner that lowers the class
    # score (negative evidence), as on DecoyMNIST (docs/results.md).
    size = 20
    maps = (bump(size, (8, 8), 3.0) + bump(size, (12, 11), 3.0) - bump(size, (17, 17), 2.0))[None, None]
    corner, digit = (17, 17), ((8, 8), (12, 11))
    decoy = torch.zeros(size, size, dtype=torch.bool)
    decoy[16:19, 16:19] = True

    # positive: the decoy has no weight; its pixels join the cluster of a digit bump
    positive = segmenter(num_clusters=2).segment(maps, ctx).labels[0]
    assert int(positive[corner]) in {int(positive[d]) for d in digit}
    assert int(positive[digit[0]]) != int(positive[digit[1]])

    # negative: the decoy is all the weight there is, so every cluster with a share lies on it
    negative = segmenter(num_clusters=2, effect="negative").segment(maps, ctx)
    assert negative.shares[0].gt(0).all()
    assert set(negative.labels[0][decoy].tolist()) == {0, 1}

    # absolute: both digit bumps and the decoy each a cluster, shares by magnitude 3 : 3 : 2
    absolute = segmenter(num_clusters=3, effect="absolute").segment(maps, ctx)
    np.testing.assert_allclose(absolute.shares[0].numpy(), [3 / 8, 3 / 8, 2 / 8], atol=1e-6)
    assert (absolute.labels[0][decoy] == 2).all()
    assert {int(absolute.labels[0][d]) for d in digit} == {0, 1}
    assert absolute.effect == "absolute"


def test_degenerate_means_no_attribution_of_that_effect(ctx) -> None:
    only_positive = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) + 0.1
    seg = segmenter(num_clusters=3, effect="negative").segment(only_positive, ctx)
    assert seg.degenerate.tolist() == [True, True]
    assert (seg.labels == 0).all() and seg.shares.tolist() == [[1.0, 0.0, 0.0]] * 2
    assert not segmenter(num_clusters=3, effect="absolute").segment(only_positive, ctx).degenerate.any()


def test_segmentation_records_its_effect() -> None:
    base = dict(
        labels=torch.zeros(1, 2, 2, dtype=torch.long), shares=torch.ones(1, 1), num_clusters=1,
        degenerate=torch.zeros(1, dtype=torch.bool), log_likelihood=torch.zeros(1, dtype=torch.float64),
    )  # fmt: skip
    assert Segmentation(**base).effect == "positive"
    seg = Segmentation(**base, effect="absolute")
    assert Segmentation.from_state(seg.to_state()).effect == "absolute"
    # a segmentation stored before effects were an option reads as the positive effect
    old = {k: v for k, v in seg.to_state().items() if k != "effect"}
    assert Segmentation.from_state(old).effect == "positive"
    with pytest.raises(ValueError, match="Segmentation.effect must be one of"):
        Segmentation(**base, effect="both")
    with pytest.raises(ValueError, match="CritiqueRequest.effect must be one of"):
        request("both")


# -- prompts --------------------------------------------------------------------------------------

#: sha256 of each family's positive critic prompt for :func:`request` with the label "7", as it
#: was before effects became an option. The positive prompt must stay word for word the same
#: under the same version (the version is part of the response cache key): when you change it,
#: bump the template's version and update these.
POSITIVE_PROMPTS = {
    "decoy-mnist": ("decoy-mnist.critic/1", "f633b1064ca11efe2948e2270d46e99f934dc66e1e6e1842ae03087d55e740f3"),
    "knee": ("knee.critic/1", "416cb26c14a5402ad8d6b6c5f4a70e095064bb4f3f9c2090ebbeba5f7dbcf659"),
    "skin": ("skin.critic/1", "bff24e2ae6edad49035f1ee15eb771b3ab883973f41f99e1dc1c8d8e20d03588"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_positive_prompt_is_unchanged(family: str) -> None:
    template = load_template(family, "critic")
    text = render_critic_prompt(template, request("positive", family))
    assert (template.version, hashlib.sha256(text.encode()).hexdigest()) == POSITIVE_PROMPTS[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_says_which_effect_its_clusters_show(family: str) -> None:
    template = load_template(family, "critic")
    assert [e for e, _ in template.effects] == list(EFFECTS)
    positive = render_critic_prompt(template, request("positive", family, label="cls-X"))
    negative = render_critic_prompt(template, request("negative", family, label="cls-X"))
    absolute = render_critic_prompt(template, request("absolute", family, label="cls-X"))
    for text in (negative, absolute):
        assert not any(p in text for p in PLACEHOLDERS)
        assert '"Verdict: yes"' in text and '"Verdict: no"' in text
        assert len(text) > len(positive)
    texts = dict(template.effects)
    assert texts["positive"] == ""
    assert "evidence against the class <label>" in texts["negative"]
    assert "evidence against the class cls-X" in negative
    assert "evidence for cls-X" in absolute or "evidence for the class cls-X" in absolute
    assert "evidence against" in absolute
    assert "evidence against" not in positive
    # the effect's text stands where the positive prompt has nothing: the rest is the same
    effect_text = dict(template.effects)["negative"].replace("<label>", "cls-X")
    assert negative.replace(effect_text, "") == positive


def _write(tmp_path, body: str):
    path = tmp_path / "mine.critic.toml"
    path.write_text('version = "mine/1"\n' + body, encoding="utf-8")
    return path


def test_a_template_without_effect_serves_only_the_positive_effect(tmp_path) -> None:
    path = _write(tmp_path, 'text = "<label> <class_description> <num_clusters> <cluster_colors>"\n')
    template = load_template("custom", "critic", path)
    assert render_critic_prompt(template, request("positive")).startswith("7 A bar")
    with pytest.raises(TemplateError) as info:
        render_critic_prompt(template, request("negative"))
    message = str(info.value)
    assert str(path) in message and "negative effect (segmenter.effect)" in message
    assert "<effect>" in message and "[effects]" in message


def test_a_user_template_with_effect_and_no_table_gets_the_default_texts(tmp_path) -> None:
    path = _write(tmp_path, 'text = "Image <label>.<effect> <class_description> <num_clusters> <cluster_colors>"\n')
    template = load_template("custom", "critic", path)
    assert dict(template.effects) == DEFAULT_EFFECT_TEXTS
    assert render_critic_prompt(template, request("positive")) == "Image 7. A bar and a slant. 3 red, blue, green"
    negative = render_critic_prompt(template, request("negative"))
    assert negative.startswith("Image 7. The clusters mark evidence against the class 7: regions")
    assert "<" not in negative
    assert "evidence for 7" in render_critic_prompt(template, request("absolute"))


def test_a_user_template_with_effect_texts(tmp_path) -> None:
    path = _write(
        tmp_path,
        'text = "Clusters of <label><effect>: <class_description> <num_clusters> <cluster_colors>"\n'
        '[effects]\npositive = ""\nnegative = " (against <label>)"\nabsolute = " (for or against)"\n',
    )
    template = load_template("custom", "critic", path)
    assert render_critic_prompt(template, request("negative")).startswith("Clusters of 7 (against 7): A bar")
    assert render_critic_prompt(template, request("positive")).startswith("Clusters of 7: A bar")


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ('text = "<label> <class_description> <num_clusters> <cluster_colors> <effect>"\neffects = "x"\n', "'effects' must be a table"),
        (
            'text = "<label> <class_description> <num_clusters> <cluster_colors> <effect>"\n'
            '[effects]\npositive = ""\nnegative = "x"\n',
            "[effects] lacks absolute",
        ),
        (
            'text = "<label> <class_description> <num_clusters> <cluster_colors> <effect>"\n'
            '[effects]\npositive = ""\nnegative = "x"\nabsolute = "y"\nsigned = "z"\n',
            "unknown keys ['signed']",
        ),
        (
            'text = "<label> <class_description> <num_clusters> <cluster_colors> <effect>"\n'
            '[effects]\npositive = ""\nnegative = 1\nabsolute = "y"\n',
            "negative must be a string",
        ),
        (
            'text = "<label> <class_description> <num_clusters> <cluster_colors>"\n'
            '[effects]\npositive = ""\nnegative = "x"\nabsolute = "y"\n',
            "no <effect> to put it in",
        ),
    ],
)
def test_bad_effect_tables_name_file_and_problem(tmp_path, body: str, needle: str) -> None:
    path = _write(tmp_path, body)
    with pytest.raises(TemplateError) as info:
        load_template("custom", "critic", path)
    assert str(path) in str(info.value) and needle in str(info.value)
