"""Tests of the MLP model factory."""

from __future__ import annotations

import pydantic
import pytest
import torch
from torch import nn

from lvlmva.plugins.models.mlp import Mlp, MlpFactory
from lvlmva.protocols import ModelFactory, check_capabilities


def test_default_is_one_hidden_layer_of_256():
    model = MlpFactory(MlpFactory.Options()).build((1, 28, 28), 10)
    assert isinstance(model, Mlp)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 256), (256, 10)]
    x = torch.rand(5, 1, 28, 28)
    assert model.features(x).shape == (5, 256)
    assert model(x).shape == (5, 10)
    torch.testing.assert_close(model(x), model.head(model.features(x)))
    assert isinstance(model.head, nn.Linear)


def test_hidden_layers_and_distinct_relus():
    model = MlpFactory(MlpFactory.Options(hidden=[32, 16, 8])).build((3, 4, 5), 4)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 3 and len({id(m) for m in relus}) == 3
    x = torch.rand(2, 3, 4, 5)
    assert model.features(x).shape == (2, 8) and model(x).shape == (2, 4)
    # features = ReLU after each hidden layer, the head left out (a hand-written twin)
    hidden = [m for m in model.modules() if isinstance(m, nn.Linear)][:-1]
    want = x.flatten(1)
    for layer in hidden:
        want = torch.relu(want @ layer.weight.T + layer.bias)
    torch.testing.assert_close(model.features(x), want)


def test_no_hidden_layers_is_a_linear_model():
    model = MlpFactory(MlpFactory.Options(hidden=[])).build((1, 2, 2), 3)
    x = torch.rand(6, 1, 2, 2)
    torch.testing.assert_close(model.features(x), x.flatten(1))
    torch.testing.assert_close(model(x), x.flatten(1) @ model.head.weight.T + model.head.bias)


def test_options_are_checked():
    with pytest.raises(pydantic.ValidationError, match="hidden width"):
        MlpFactory.Options(hidden=[16, 0])
    with pytest.raises(pydantic.ValidationError):
        MlpFactory.Options(width=3)
    with pytest.raises(ValueError, match="num_classes"):
        MlpFactory(MlpFactory.Options()).build((1, 2, 2), 0)


def test_fills_the_model_role():
    assert check_capabilities("model", MlpFactory) == []
    assert isinstance(MlpFactory(MlpFactory.Options()), ModelFactory)
    assert all(f.description for f in MlpFactory.Options.model_fields.values())
    assert MlpFactory.__doc__.splitlines()[0].strip()


def test_same_seed_same_initial_weights():
    factory = MlpFactory(MlpFactory.Options())
    torch.manual_seed(3)
    a = factory.build((1, 28, 28), 10).state_dict()
    torch.manual_seed(3)
    b = factory.build((1, 28, 28), 10).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
