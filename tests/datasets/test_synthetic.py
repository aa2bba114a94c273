"""The synthetic skin and knee proxies: seeded, exact shortcut shares per class and split, true
masks that are exactly the shortcut's pixels, compact uint8 storage with recorded normalisation."""

from __future__ import annotations

import pytest
import torch

from lvlmva.datasets.synthetic import (
    SyntheticKneeProvider,
    SyntheticSkinProvider,
    draw_knee,
    draw_skin,
)
from lvlmva.protocols import DatasetProvider, RunContext


def ctx(tmp_path, seed=0) -> RunContext:
    return RunContext(seed=seed, device=torch.device("cpu"), run_dir=tmp_path, stage_dir=tmp_path, cache_dir=tmp_path)


@pytest.mark.parametrize("provider", [SyntheticSkinProvider, SyntheticKneeProvider])
def test_splits_groups_shares_and_masks(tmp_path, provider):
    opts = provider.Options(size=32, train_size=200, val_size=40, test_size=100)
    assert isinstance(provider(opts), DatasetProvider)
    data = provider(opts).load(ctx(tmp_path))
    channels = 3 if provider is SyntheticSkinProvider else 1
    assert data.input_shape == (channels, 32, 32) and data.family in ("skin", "knee")
    assert len(data.train) == 200 and len(data.val) == 40 and len(data.test) == 100
    assert data.class_names == (("benign", "malignant") if channels == 3 else ("no osteoarthritis", "osteoarthritis"))
    assert len(data.group_names) == 4 and data.group_names[1].endswith(("/patch", "/marker"))
    for split, shares in ((data.train, opts.share_train), (data.test, (0.5, 0.5)), (data.val, (0.5, 0.5))):
        assert split.images.dtype == torch.uint8 and split.normalization is not None
        for y in (0, 1):
            members = split.labels == y
            assert int(members.sum()) == round(0.5 * len(split))
            flagged = split.groups[members] % 2 == 1
            assert int(flagged.sum()) == round(shares[y] * int(members.sum()))
        # the true mask is non-empty exactly on images with the shortcut
        has_mask = split.spurious_masks.flatten(1).any(1)
        assert torch.equal(has_mask, split.groups % 2 == 1)
    # normalised training inputs have mean 0 and std 1 per channel
    x = data.train.inputs[torch.arange(len(data.train))]
    assert x.dtype == torch.float32
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(channels), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.ones(channels), atol=1e-3, rtol=0)


@pytest.mark.parametrize("provider", [SyntheticSkinProvider, SyntheticKneeProvider])
def test_seeded(tmp_path, provider):
    opts = provider.Options(size=24, train_size=20, val_size=0, test_size=10)
    a, b = provider(opts).load(ctx(tmp_path)), provider(opts).load(ctx(tmp_path))
    c = provider(opts).load(ctx(tmp_path, seed=1))
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.spurious_masks, b.test.spurious_masks)
    assert not torch.equal(a.train.images, c.train.images)
    assert a.val is None


def test_the_shortcut_pixels_are_the_mask():
    """Drawing the same images with and without the shortcut changes exactly the masked pixels."""
    labels = torch.tensor([0, 1, 0, 1])
    for draw in (draw_skin, draw_knee):
        with_it, mask = draw(labels, torch.ones(4, dtype=torch.bool), 48, torch.Generator().manual_seed(5))
        without, none = draw(labels, torch.zeros(4, dtype=torch.bool), 48, torch.Generator().manual_seed(5))
        assert not none.any() and mask.flatten(1).any(1).all()
        changed = (with_it != without).any(dim=1)
        assert not (changed & ~mask).any()  # nothing outside the mask differs
        assert changed.sum() > 0.3 * mask.sum()  # and most of the mask does


def test_classes_differ_as_the_specifications_say():
    """Malignant lesions cover more of the image than benign ones; osteoarthritic joints have
    a narrower (darker-free) joint space: measured on the drawn pixels."""
    n = 200
    labels = torch.arange(n) % 2
    img, _ = draw_skin(labels, torch.zeros(n, dtype=torch.bool), 64, torch.Generator().manual_seed(0))
    dark = (img.float().mean(1) < 120).flatten(1).float().mean(1)  # lesion pixels are darker than skin
    assert dark[labels == 1].mean() > 1.5 * dark[labels == 0].mean()
    knee, _ = draw_knee(labels, torch.zeros(n, dtype=torch.bool), 64, torch.Generator().manual_seed(0))
    centre = knee[:, 0, 16:48, 24:40].float()  # the joint's middle columns
    gap_rows = (centre.mean(2) < 90).sum(1).float()  # dark rows between the bones
    assert gap_rows[labels == 0].mean() > gap_rows[labels == 1].mean()


def test_options_are_checked():
    with pytest.raises(ValueError):
        SyntheticSkinProvider.Options(share_train=(1.2, 0.0))
    with pytest.raises(ValueError):
        SyntheticKneeProvider.Options(size=8)
