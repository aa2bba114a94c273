"""DeepLiftShap attributor: hand-checked DeepLift, completeness, and the ResNet ReLU-reuse trap."""

from __future__ import annotations

import dataclasses

import pydantic
import pytest
import torch
import torchvision
from torch import nn

from lvlmva.plugins.attributors.deeplift_shap import (
    DeepLiftBasicBlock,
    DeepLiftBottleneck,
    DeepLiftShapAttributor,
    count_module_calls,
    prepare_model_for_deeplift,
)
from lvlmva.protocols import Attributor


def attributor(**options) -> DeepLiftShapAttributor:
    return DeepLiftShapAttributor(DeepLiftShapAttributor.Options(**options))


class ReusedRelu(nn.Module):
    """An MLP on [B, 1, 2, 2] images that calls one ReLU module twice (the ResNet pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.fc2(self.relu(self.fc1(self.flatten(x))))))


class BranchingReuse(ReusedRelu):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.fc1(self.flatten(x)))
        if h.sum() > -1:
            h = self.relu(self.fc2(h))
        return self.head(h)


def tiny_resnet(block: type, layers: list[int]) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet.ResNet(block, layers, num_classes=10)
    # Non-trivial batch-norm statistics, so eval mode is not the identity.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return model.eval()


def completeness_gap(model: nn.Module, x, targets, attributions, background) -> torch.Tensor:
    """sum(attributions) - (f(x) - mean f(background)) for the target class, per sample."""
    with torch.no_grad():
        fx = model(x).gather(1, targets[:, None]).squeeze(1)
        fb = model(background)[:, targets].mean(0)
    return attributions.flatten(1).sum(1).double() - (fx - fb).double()


def test_hand_computed_deeplift_rescale_rule(ctx) -> None:
    # f(x) = w2 . relu(W1 x + b1) + b2 on two inputs; DeepLift's rescale rule by hand:
    # m_j = (relu(z_j) - relu(z0_j)) / (z_j - z0_j); attr_i = (x_i - r_i) sum_j w2_j m_j W1_ji.
    net = nn.Sequential(nn.Flatten(), nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[1.0, -1.0], [2.0, 1.0]]))
        net[1].bias.copy_(torch.tensor([0.5, -1.0]))
        net[3].weight.copy_(torch.tensor([[3.0, -2.0]]))
        net[3].bias.copy_(torch.tensor([0.1]))
    x = torch.tensor([[[[1.0, 2.0]]]])
    pool = torch.tensor([[[[0.0, 0.0]]], [[[2.0, -1.0]]]])
    # Baseline (0, 0): z = (-0.5, 3), z0 = (0.5, -1), m = (0.5, 0.75) -> attr (-1.5, -6).
    # Baseline (2, -1): z0 = (3.5, 2), m = (0.875, 1) -> attr (1.375, -13.875).
    expected = torch.tensor([[[[(-1.5 + 1.375) / 2, (-6.0 - 13.875) / 2]]]])
    got = attributor(background_size=2).attribute(net, x, torch.tensor([0]), pool, ctx)
    torch.testing.assert_close(got, expected)
    # Without multiplying by inputs, Captum returns the mean multiplier per input.
    multipliers = attributor(background_size=2, multiply_by_inputs=False).attribute(
        net, x, torch.tensor([0]), pool, ctx
    )
    torch.testing.assert_close(
        multipliers, torch.tensor([[[[(-1.5 - 1.375) / 2, (-3.0 - 4.625) / 2]]]])
    )


def test_reused_relu_trap_raises_without_preparation(ctx) -> None:
    model = ReusedRelu().eval()
    x, pool = torch.randn(3, 1, 2, 2), torch.randn(10, 1, 2, 2)
    with pytest.raises(RuntimeError, match="more than once"):
        attributor(background_size=4, prepare_model=False).attribute(
            model, x, torch.tensor([0, 1, 2]), pool, ctx
        )
    attr = attributor(background_size=4).attribute(model, x, torch.tensor([0, 1, 2]), pool, ctx)
    background = attributor(background_size=4).draw_background(pool, ctx)
    gap = completeness_gap(model, x, torch.tensor([0, 1, 2]), attr, background)
    assert gap.abs().max() < 1e-5


def test_generic_preparation_splits_reused_modules() -> None:
    model = ReusedRelu().eval()
    x = torch.randn(5, 1, 2, 2)
    assert count_module_calls(model, x)["relu"] == 2
    for prepared in (prepare_model_for_deeplift(model, x), prepare_model_for_deeplift(model)):
        calls = count_module_calls(prepared, x)
        assert max(calls.values()) == 1 and len([n for n in calls if "relu" in n]) == 2
        assert not any(getattr(m, "inplace", False) for m in prepared.modules())
        torch.testing.assert_close(prepared(x), model(x), atol=0, rtol=0)
    # The caller's model is left as it was.
    assert model.relu.inplace and count_module_calls(model, x)["relu"] == 2


def test_untraceable_reuse_is_reported() -> None:
    model = BranchingReuse().eval()
    with pytest.raises(ValueError, match="cannot trace BranchingReuse"):
        prepare_model_for_deeplift(model, torch.randn(2, 1, 2, 2))


def test_model_without_reuse_is_copied_unchanged() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(inplace=True), nn.Linear(3, 2))
    prepared = prepare_model_for_deeplift(model, torch.randn(1, 1, 2, 2))
    assert type(prepared) is nn.Sequential and prepared is not model
    assert not prepared[2].inplace and model[2].inplace
    assert prepared[1].weight is not model[1].weight


@pytest.mark.parametrize(
    ("block", "layers", "prepared_block", "relus"),
    [
        (torchvision.models.resnet.BasicBlock, [2, 2, 2, 2], DeepLiftBasicBlock, 2),
        (torchvision.models.resnet.Bottleneck, [1, 1, 1, 1], DeepLiftBottleneck, 3),
    ],
    ids=["resnet18", "bottleneck"],
)
def test_resnet_preparation(block, layers, prepared_block, relus) -> None:
    model = tiny_resnet(block, layers)
    x = torch.randn(1, 3, 32, 32)
    assert max(count_module_calls(model, x).values()) > 1  # the trap is there
    prepared = prepare_model_for_deeplift(model, x)
    calls = count_module_calls(prepared, x)
    assert max(calls.values()) == 1, {n: c for n, c in calls.items() if c > 1}
    blocks = [m for m in prepared.modules() if isinstance(m, block)]
    assert blocks and all(type(m) is prepared_block for m in blocks)
    assert all(
        len([n for n, _ in m.named_children() if n.startswith("relu")]) == relus for m in blocks
    )
    assert not any(getattr(m, "inplace", False) for m in prepared.modules())
    with torch.no_grad():
        assert torch.equal(prepared(x), model(x))
    assert prepared.state_dict().keys() == model.state_dict().keys()
    # The same class, so features and head of a model stay usable.
    assert type(prepared) is type(model)


def test_resnet18_deeplift_shap_completeness(ctx) -> None:
    model = tiny_resnet(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2])
    # Captum's MaxPool2d rule does not sum to the output difference (it routes deltas with
    # max_unpool, which drops overlapping windows, and has a batch-indexing bug, captum issue
    # 1276), so completeness is checked without the stem pool; everything else of resnet18
    # (residual adds, batch norm, the split ReLUs) is exact.
    model.maxpool = nn.Identity()
    gen = torch.Generator().manual_seed(1)
    x, pool = torch.randn(2, 3, 32, 32, generator=gen), torch.randn(8, 3, 32, 32, generator=gen)
    targets = torch.tensor([3, 7])
    attr_plugin = attributor(background_size=3)
    attr = attr_plugin.attribute(model, x, targets, pool, ctx)
    assert attr.shape == x.shape and attr.dtype == torch.float32 and attr.device.type == "cpu"
    gap = completeness_gap(model, x, targets, attr, attr_plugin.draw_background(pool, ctx))
    assert gap.abs().max() < 1e-4
    # The caller's model keeps its reused in-place ReLU and its mode.
    assert model.layer1[0].relu.inplace and not model.training


def test_resnet18_with_max_pool_runs(ctx) -> None:
    model = tiny_resnet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    x, pool = torch.randn(2, 3, 32, 32), torch.randn(4, 3, 32, 32)
    attr = attributor(background_size=2).attribute(model, x, torch.tensor([0, 9]), pool, ctx)
    assert attr.shape == x.shape and torch.isfinite(attr).all()
    # Completeness does not hold exactly through the max pool (see above), so the values are
    # pinned instead (one CPU run, the same with 1 and 2 threads; seeded model and inputs).
    torch.testing.assert_close(
        attr.flatten(1).sum(1), torch.tensor([-0.060889, -0.070773]), rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(
        attr.abs().flatten(1).sum(1), torch.tensor([3.27162, 4.07440]), rtol=1e-4, atol=1e-6
    )


def test_background_is_seeded_and_chunking_does_not_matter(ctx) -> None:
    model = ReusedRelu().eval()
    x, pool = torch.randn(7, 1, 2, 2), torch.randn(40, 1, 2, 2)
    targets = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    plugin = attributor()
    bg = plugin.draw_background(pool, ctx)
    assert bg.shape == (25, 1, 2, 2)
    assert torch.equal(bg, plugin.draw_background(pool, ctx))
    assert not torch.equal(bg, plugin.draw_background(pool, dataclasses.replace(ctx, seed=1)))
    whole = attributor(batch_size=16).attribute(model, x, targets, pool, ctx)
    split = attributor(batch_size=3).attribute(model, x, targets, pool, ctx)
    torch.testing.assert_close(whole, split)
    assert torch.equal(whole, attributor(batch_size=16).attribute(model, x, targets, pool, ctx))


def test_input_errors_name_the_problem(ctx) -> None:
    model = ReusedRelu().eval()
    with pytest.raises(ValueError, match="background_size is 25"):
        attributor().attribute(
            model, torch.randn(2, 1, 2, 2), torch.tensor([0, 1]), torch.randn(5, 1, 2, 2), ctx
        )
    with pytest.raises(ValueError, match="targets must be"):
        attributor().attribute(
            model, torch.randn(2, 1, 2, 2), torch.tensor([0]), torch.randn(30, 1, 2, 2), ctx
        )
    with pytest.raises(ValueError, match="reference_pool must be"):
        attributor().attribute(
            model, torch.randn(2, 1, 2, 2), torch.tensor([0, 1]), torch.randn(30, 1, 3, 3), ctx
        )


def test_options_and_protocol() -> None:
    plugin = attributor()
    assert isinstance(plugin, Attributor) and DeepLiftShapAttributor.needs_background
    opts = plugin.options
    assert (opts.background_size, opts.multiply_by_inputs, opts.prepare_model) == (25, True, True)
    with pytest.raises(pydantic.ValidationError):
        DeepLiftShapAttributor.Options(background_size=1)
    with pytest.raises(pydantic.ValidationError):
        DeepLiftShapAttributor.Options(baseline="zeros")
    for name, field in DeepLiftShapAttributor.Options.model_fields.items():
        assert field.description, name


@pytest.mark.gpu
def test_cuda_matches_cpu(ctx) -> None:
    model = tiny_resnet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    x, pool = torch.randn(2, 3, 32, 32), torch.randn(8, 3, 32, 32)
    targets = torch.tensor([1, 2])
    cpu = attributor(background_size=3).attribute(model, x, targets, pool, ctx)
    gpu = attributor(background_size=3).attribute(
        model, x, targets, pool, dataclasses.replace(ctx, device=torch.device("cuda"))
    )
    assert gpu.device.type == "cpu"
    torch.testing.assert_close(gpu, cpu, atol=1e-3, rtol=1e-3)


def test_rescale_relu_rule_uses_the_gradient_where_a_pair_is_equal():
    from lvlmva.plugins.attributors.rescale import RescaleReLU

    a = torch.tensor([[2.0, -1.0, 3.0, -2.0, 0.5, 0.0]])
    b = torch.tensor([[2.0, -1.0, -1.0, 1.0, 0.5 + 1e-12, 0.0]])
    x = torch.cat([a, b]).requires_grad_(True)
    y = RescaleReLU()(x)
    assert torch.equal(y, torch.relu(x))
    (grad,) = torch.autograd.grad(y, x, torch.tensor([[1.0] * 6, [2.0] * 6]))
    # equal pairs: the ordinary gradient (1 above the threshold, 0 below or at it); a pair
    # closer than EPS counts as equal; straddling pairs: (relu(a) - relu(b)) / (a - b)
    multiplier = torch.tensor([1.0, 0.0, 0.75, 1 / 3, 1.0, 0.0])
    assert torch.isfinite(grad).all()
    assert torch.allclose(grad, torch.stack([multiplier, 2 * multiplier]))
