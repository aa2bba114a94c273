"""Tests of lvlmva.testing.data.tiny_decoy_dataset."""

from __future__ import annotations

import torch

from lvlmva.records import SpuriousDataset
from lvlmva.testing.data import tiny_decoy_dataset


def test_tiny_dataset_shapes_and_contents():
    data = tiny_decoy_dataset()
    assert isinstance(data, SpuriousDataset)
    assert (len(data.train), len(data.test), data.val) == (512, 256, None)
    assert data.train.images.shape == (512, 1, 28, 28) and data.train.images.dtype == torch.float32
    assert data.family == "decoy-mnist" and data.input_scale == "0-255" and data.num_classes == 10
    assert float(data.train.images.max()) == 255.0
    assert torch.equal(data.train.spurious_masks.sum(dim=(1, 2)), torch.full((512,), 16))
    assert len(data.group_names) == 20


def test_tiny_dataset_options():
    small = tiny_decoy_dataset(n_train=40, n_test=20, n_val=10, seed=4, scale="0-1")
    assert (len(small.train), len(small.test), len(small.val)) == (40, 20, 10)
    assert small.input_scale == "0-1" and float(small.train.images.max()) <= 1.0
    again = tiny_decoy_dataset(n_train=40, n_test=20, n_val=10, seed=4, scale="0-1")
    assert torch.equal(small.test.images, again.test.images)
