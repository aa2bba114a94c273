"""The ``resnet`` model: torchvision architectures with a new head, 1 or 3 channels, local
ImageNet weights only, features and head for DFR, and exact DeepLiftShap on ResNet-50."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from lvlmva.plugins.attributors.deeplift_shap import DeepLiftShapAttributor
from lvlmva.plugins.models.resnet import ResNetClassifier, ResNetFactory
from lvlmva.protocols import ModelFactory, RunContext


def factory(**options) -> ResNetFactory:
    return ResNetFactory(ResNetFactory.Options(**options))


@pytest.fixture
def ctx(tmp_path) -> RunContext:
    return RunContext(seed=0, device=torch.device("cpu"), run_dir=tmp_path, stage_dir=tmp_path, cache_dir=tmp_path)


@pytest.mark.parametrize(("depth", "width"), [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_architectures_expose_features_and_head(depth, width):
    torch.manual_seed(0)
    model = factory(depth=depth, stem="small").build((3, 16, 16), 5).eval()
    assert isinstance(factory(), ModelFactory)
    x = torch.randn(2, 3, 16, 16)
    assert model.features(x).shape == (2, width)
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 5
    torch.testing.assert_close(model(x), model.head(model.features(x)))


def test_one_channel_and_the_imagenet_stem():
    torch.manual_seed(0)
    model = factory().build((1, 64, 64), 2).eval()
    assert model.backbone.conv1.in_channels == 1 and model.backbone.conv1.stride == (2, 2)
    assert model(torch.randn(3, 1, 64, 64)).shape == (3, 2)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        factory().build((2, 32, 32), 2)


def test_local_imagenet_weights_are_loaded_and_summed_for_one_channel(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-imagenet.pt"
    torch.save(reference.state_dict(), path)
    rgb = factory(weights=path).build((3, 32, 32), 3)
    for key, value in reference.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(rgb.backbone.state_dict()[key], value), key
    grey = factory(weights=path).build((1, 32, 32), 3)
    torch.testing.assert_close(grey.backbone.conv1.weight, reference.conv1.weight.sum(1, keepdim=True))
    # the small stem keeps everything but its new first convolution
    small = factory(weights=path, stem="small").build((3, 32, 32), 3)
    assert torch.equal(small.backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert small.backbone.conv1.kernel_size == (3, 3)


def test_weights_that_do_not_fit_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        factory(weights=tmp_path / "absent.pt").build((3, 32, 32), 2)
    other = tmp_path / "resnet50.pt"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), other)
    with pytest.raises(ValueError, match=r"resnet50\.pt does not fit this architecture"):
        factory(depth="resnet18", weights=other).build((3, 32, 32), 2)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read"):
        factory(weights=junk).build((3, 32, 32), 2)


def test_deeplift_shap_is_complete_on_resnet50(ctx):
    """Captum's completeness: the attributions of each input sum to f(x) - mean f(background),
    through ResNet-50's bottlenecks (three ReLU uses each, given their own modules by the
    attributor's preparation). The small stem has no max pool, whose Captum rule is not exact."""
    torch.manual_seed(0)
    model = factory(depth="resnet50", stem="small").build((3, 16, 16), 4)
    with torch.no_grad():  # non-trivial batch-norm statistics, so eval mode is not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    model.eval()
    assert isinstance(model, ResNetClassifier)
    gen = torch.Generator().manual_seed(2)
    x, pool = torch.randn(2, 3, 16, 16, generator=gen), torch.randn(6, 3, 16, 16, generator=gen)
    targets = torch.tensor([1, 3])
    plugin = DeepLiftShapAttributor(DeepLiftShapAttributor.Options(background_size=3))
    attr = plugin.attribute(model, x, targets, pool, ctx)
    background = plugin.draw_background(pool, ctx)
    with torch.no_grad():
        fx = model(x).gather(1, targets[:, None]).squeeze(1)
        fb = model(background)[:, targets].mean(0)
    gap = attr.flatten(1).sum(1).double() - (fx - fb).double()
    assert gap.abs().max() < 1e-3 * (fx - fb).abs().max().clamp(min=1.0)
    # the caller's model is unchanged: its blocks still reuse their in-place ReLU
    assert model.backbone.layer1[0].relu.inplace


def _bn_stats(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("stem", ["small", "imagenet"])
def test_rescale_engine_equals_captum_without_max_pool_and_is_complete_with_it(ctx, stem):
    torch.manual_seed(0)
    model = _bn_stats(factory(depth="resnet18", stem=stem).build((3, 16, 16), 4))
    gen = torch.Generator().manual_seed(3)
    x, pool = torch.randn(2, 3, 16, 16, generator=gen), torch.randn(5, 3, 16, 16, generator=gen)
    targets = torch.tensor([1, 3])
    captum = DeepLiftShapAttributor(DeepLiftShapAttributor.Options(background_size=3))
    rescale = DeepLiftShapAttributor(DeepLiftShapAttributor.Options(background_size=3, engine="rescale"))
    a = captum.attribute(model, x, targets, pool, ctx)
    b = rescale.attribute(model, x, targets, pool, ctx)
    background = rescale.draw_background(pool, ctx)
    with torch.no_grad():
        diff = (model(x).gather(1, targets[:, None]).squeeze(1) - model(background)[:, targets].mean(0)).double()
    gap = lambda attr: (attr.flatten(1).sum(1).double() - diff).abs().max()  # noqa: E731
    assert gap(b) < 1e-5 * max(1.0, float(diff.abs().max()))
    if stem == "small":  # no max pool: the same rule, the same numbers
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    else:  # Captum's max-pool rule loses part of the difference (overwritten windows)
        assert gap(a) > 100 * gap(b)


def test_rescale_engine_refuses_nonlinearities_it_has_no_rule_for(ctx):
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.Sigmoid(), nn.Linear(4, 2)).eval()
    plugin = DeepLiftShapAttributor(DeepLiftShapAttributor.Options(background_size=2, engine="rescale"))
    with pytest.raises(ValueError, match=r"no rule for 2 \(Sigmoid\)"):
        plugin.attribute(model, torch.randn(1, 3, 2, 2), torch.tensor([0]), torch.randn(4, 3, 2, 2), ctx)
