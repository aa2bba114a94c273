"""Compact splits: uint8 pixels (or a memory map) normalised per batch give the same inputs,
the same training and the same predictions as the float32 split they stand for, at a quarter
of the memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lvlmva.records import Inputs, Normalization, Split
from lvlmva.settings import TrainOptions
from lvlmva.training import Trainer, predict_logits


def _uint8_split(n=96, seed=0) -> Split:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.randint(0, 256, (n, 3, 6, 6), generator=g, dtype=torch.uint8)
    images[labels == 1, :, :2, :2] = 250
    images[labels == 2, :, -2:, -2:] = 250
    norm = Normalization(mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3), scale=1 / 255)
    return Split(images=images, labels=labels, normalization=norm)


def _float_twin(split: Split) -> Split:
    return Split(images=split.normalization.apply(split.images), labels=split.labels)


def _build() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(108, 12), nn.ReLU(), nn.Linear(12, 3))


def test_inputs_are_the_normalised_pixels_row_by_row():
    split = _uint8_split()
    inputs = split.inputs
    assert isinstance(inputs, Inputs) and inputs.shape == split.images.shape and len(inputs) == len(split)
    want = (split.images.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.25, 0.2, 0.3]).view(1, 3, 1, 1)
    index = torch.tensor([5, 0, 5, 40])
    torch.testing.assert_close(inputs[index], want[index])
    torch.testing.assert_close(inputs[3], want[3])
    torch.testing.assert_close(inputs[2:7], want[2:7])
    torch.testing.assert_close(inputs.index_select(0, index), want[index])
    assert inputs[index].dtype == torch.float32
    # a split without normalization gives its own tensor, not a copy
    plain = Split(images=want, labels=split.labels)
    assert plain.inputs is plain.images
    # subsets and saved states keep the normalization
    assert split.subset(index).normalization == split.normalization
    assert Split.from_state(split.to_state()).normalization == split.normalization


def test_uint8_needs_a_normalization_of_its_channel_count():
    images = torch.zeros((2, 3, 4, 4), dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8 need a normalization"):
        Split(images=images, labels=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="1 channels, images have 3"):
        Split(images=images, labels=torch.zeros(2, dtype=torch.int64), normalization=Normalization((0.5,), (0.2,)))


@pytest.mark.parametrize("resident", ["always", "never"])
def test_training_on_uint8_equals_training_on_the_float_twin(tmp_path, resident):
    from lvlmva.protocols import RunContext

    ctx = RunContext(seed=0, device=torch.device("cpu"), run_dir=tmp_path, stage_dir=tmp_path, cache_dir=tmp_path)
    split = _uint8_split()
    models = []
    for data in (split, _float_twin(split)):
        torch.manual_seed(0)
        trainer = Trainer(_build, TrainOptions(epochs=2, lr=1e-2, batch_size=16, resident=resident), ctx)
        models.append(trainer.fit(data, tag="f"))
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        predict_logits(models[0], split.inputs, "cpu", batch_size=7), predict_logits(models[0], _float_twin(split).inputs, "cpu")
    )


def test_a_read_only_memory_map_works(tmp_path):
    split = _uint8_split(n=10)
    path = tmp_path / "pixels.u8"
    split.images.numpy().tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r", shape=tuple(split.images.shape))
    with pytest.warns(UserWarning, match="not writable"):
        stored = torch.from_numpy(mapped)
    on_disk = Split(images=stored, labels=split.labels, normalization=split.normalization)
    torch.testing.assert_close(on_disk.inputs[torch.arange(10)], split.inputs[torch.arange(10)])


def test_a_uint8_split_keeps_a_quarter_of_the_float_memory_also_where_it_is_moved():
    """What a resident training loop holds: ``inputs.to(device)`` moves the stored uint8
    pixels, not a float32 copy (10,000 RGB images of 224 x 224: 1.5 GB instead of 6 GB)."""
    split = _uint8_split(n=8)
    float_twin = _float_twin(split)
    assert split.inputs.nbytes * 4 == float_twin.inputs.nbytes
    moved = split.inputs.to("cpu")
    assert isinstance(moved, Inputs) and moved.stored.dtype == torch.uint8 and moved.nbytes == split.images.nbytes
    torch.testing.assert_close(moved[torch.arange(8)], float_twin.images)


def test_uint8_splits_are_shown_in_their_true_colours():
    """What a critic or a person sees is the stored pixels, not the per-channel normalised
    inputs (which would shift the hues: a brown lesion would not look brown)."""
    from lvlmva.rendering import to_display

    split = _uint8_split(n=4)
    shown = to_display(split.display(torch.arange(4)))
    assert shown.dtype == torch.uint8 and torch.equal(shown, split.images.permute(0, 2, 3, 1))
    grey = Split(images=split.images[:, :1].contiguous(), labels=split.labels, normalization=Normalization((0.5,), (0.25,), 1 / 255))
    assert torch.equal(to_display(grey.display(torch.arange(4)))[..., 2], grey.images[:, 0])
    plain = Split(images=split.inputs[torch.arange(4)], labels=split.labels)
    assert torch.equal(plain.display(torch.arange(4)), plain.images)
