"""Integrated Gradients, GradientSHAP and Grad-CAM: the DeepLiftShap attributor's contract,
checked against hand-computable cases and plain-autograd twins, and inside a pipeline run."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch
import torchvision
from torch import nn

from lvlmva.plugins.attributors.gradients import (
    GradCamAttributor,
    GradientShapAttributor,
    IntegratedGradientsAttributor,
    conv_layer_names,
)
from lvlmva.plugins.models.cnn import SmallCnn
from lvlmva.plugins.models.mlp import Mlp
from lvlmva.protocols import Attributor

ATTRIBUTORS = {
    "integrated-gradients": IntegratedGradientsAttributor,
    "gradient-shap": GradientShapAttributor,
    "grad-cam": GradCamAttributor,
}


def make(cls, **options):
    return cls(cls.Options(**options))


def small_cnn(channels=(4, 6), in_channels: int = 3, size: int = 12, classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return SmallCnn((in_channels, size, size), classes, list(channels)).eval()


class LinearNet(nn.Module):
    """f(x) = W flatten(x) + b: every gradient attribution has a closed form."""

    def __init__(self, shape=(2, 3, 3), classes: int = 4) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.head = nn.Linear(int(np.prod(shape)), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(x))


def output_gap(model, x, targets, attributions, reference) -> torch.Tensor:
    """sum(attributions) - (f(x) - f(reference)) for the target class, per sample."""
    with torch.no_grad():
        fx = model(x).gather(1, targets[:, None]).squeeze(1)
        fr = model(reference).gather(1, targets[:, None]).squeeze(1)
    return attributions.flatten(1).sum(1).double() - (fx - fr).double()


# -- the shared contract ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ATTRIBUTORS)
def test_protocol_flags_and_documented_options(name) -> None:
    cls = ATTRIBUTORS[name]
    assert isinstance(make(cls), Attributor)
    assert cls.needs_background is (name == "gradient-shap")
    for field_name, field in cls.Options.model_fields.items():
        assert field.description, f"{name}.{field_name}"
    with pytest.raises(pydantic.ValidationError):
        cls.Options(baselines="zeros")  # unknown keys are refused


def test_bad_values_are_refused_with_what_is_allowed() -> None:
    bad = [
        (IntegratedGradientsAttributor, {"n_steps": 0}, "greater than or equal to 1"),
        (IntegratedGradientsAttributor, {"method": "simpson"}, "gausslegendre"),
        (GradientShapAttributor, {"background_size": 0}, "greater than or equal to 1"),
        (GradientShapAttributor, {"stdevs": -0.1}, "greater than or equal to 0"),
        (GradCamAttributor, {"layer": ""}, "at least 1 character"),
        (GradCamAttributor, {"upsample": "area"}, "bilinear"),
    ]
    for cls, options, needle in bad:
        with pytest.raises(pydantic.ValidationError, match=needle):
            cls.Options(**options)


def test_batch_sizes_are_left_out_of_the_fingerprint() -> None:
    # they change how the work is chunked, not the attributions
    for cls in (IntegratedGradientsAttributor, GradCamAttributor):
        assert cls.Options.model_fields["batch_size"].json_schema_extra == {"fingerprint": False}
    for cls in ATTRIBUTORS.values():
        for field_name, field in cls.Options.model_fields.items():
            if field_name != "batch_size":
                assert not field.json_schema_extra, f"{cls.__name__}.{field_name} must be fingerprinted"


@pytest.mark.parametrize("name", ATTRIBUTORS)
def test_input_errors_name_the_problem(name, ctx) -> None:
    plugin = make(ATTRIBUTORS[name])
    model = small_cnn()
    x, pool = torch.randn(2, 3, 12, 12), torch.randn(30, 3, 12, 12)
    with pytest.raises(ValueError, match="inputs must be"):
        plugin.attribute(model, x[0], torch.tensor([0, 1]), pool, ctx)
    with pytest.raises(ValueError, match="targets must be"):
        plugin.attribute(model, x, torch.tensor([0]), pool, ctx)
    with pytest.raises(ValueError, match="reference_pool must be"):
        plugin.attribute(model, x, torch.tensor([0, 1]), torch.randn(30, 3, 10, 10), ctx)
    empty = plugin.attribute(model, x[:0], torch.tensor([], dtype=torch.long), pool, ctx)
    assert empty.shape == (0, 3, 12, 12) and empty.dtype == torch.float32


@pytest.mark.parametrize("name", ATTRIBUTORS)
def test_shape_dtype_and_the_callers_model_left_alone(name, ctx) -> None:
    model = small_cnn()
    model.features[1] = nn.ReLU(inplace=True)
    model.train()
    frozen_head = model.head.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, pool = torch.randn(3, 3, 12, 12), torch.randn(30, 3, 12, 12)
    attr = make(ATTRIBUTORS[name]).attribute(model, x, torch.tensor([0, 3, 4]), pool, ctx)
    assert attr.shape == x.shape and attr.dtype == torch.float32 and attr.device.type == "cpu"
    assert torch.isfinite(attr).all() and attr.abs().sum() > 0
    assert model.training and model.features[1].inplace
    assert not frozen_head.requires_grad and model.features[0].weight.requires_grad
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- Integrated Gradients -------------------------------------------------------------------------


def test_integrated_gradients_of_a_linear_model_is_weight_times_displacement(ctx) -> None:
    model = LinearNet().eval()
    x, targets = torch.randn(3, 2, 3, 3), torch.tensor([0, 2, 3])
    weights = model.head.weight.detach()[targets].view(3, 2, 3, 3)
    for method in ("gausslegendre", "riemann_left"):
        attr = make(IntegratedGradientsAttributor, baseline=0.5, method=method, n_steps=3).attribute(
            model, x, targets, x, ctx
        )
        torch.testing.assert_close(attr, weights * (x - 0.5))
    local = make(IntegratedGradientsAttributor, multiply_by_inputs=False).attribute(model, x, targets, x, ctx)
    torch.testing.assert_close(local, weights)


def test_integrated_gradients_completeness_and_chunking(ctx) -> None:
    model = small_cnn()
    x, targets = torch.randn(5, 3, 12, 12), torch.tensor([0, 1, 2, 3, 4])
    plugin = make(IntegratedGradientsAttributor, n_steps=64)
    attr = plugin.attribute(model, x, targets, x, ctx)
    gap = output_gap(model, x, targets, attr, torch.zeros_like(x))
    assert gap.abs().max() < 2e-3, gap
    one_by_one = make(IntegratedGradientsAttributor, n_steps=64, batch_size=1).attribute(model, x, targets, x, ctx)
    torch.testing.assert_close(one_by_one, attr, rtol=1e-5, atol=1e-6)


# -- GradientSHAP -------------------------------------------------------------------------------


def test_gradient_shap_of_a_linear_model_against_one_repeated_baseline(ctx) -> None:
    # every sampled point between b and x has the same gradient, so the draw does not matter
    model = LinearNet().eval()
    x, targets = torch.randn(2, 2, 3, 3), torch.tensor([1, 3])
    b = torch.randn(1, 2, 3, 3)
    attr = make(GradientShapAttributor, background_size=4, n_samples=7).attribute(
        model, x, targets, b.expand(10, -1, -1, -1), ctx
    )
    weights = model.head.weight.detach()[targets].view(2, 2, 3, 3)
    torch.testing.assert_close(attr, weights * (x - b))


def test_gradient_shap_expectation_approaches_the_output_difference(ctx) -> None:
    model = small_cnn()
    x, targets = torch.randn(2, 3, 12, 12), torch.tensor([1, 2])
    pool = torch.randn(40, 3, 12, 12) * 0.1
    plugin = make(GradientShapAttributor, background_size=40, n_samples=400)
    attr = plugin.attribute(model, x, targets, pool, ctx)
    background = plugin.draw_background(pool, ctx)
    with torch.no_grad():
        mean_out = model(background)[:, targets].mean(0)
        fx = model(x).gather(1, targets[:, None]).squeeze(1)
    gap = attr.flatten(1).sum(1) - (fx - mean_out)
    assert (gap.abs() / (fx - mean_out).abs()).max() < 0.1, gap


def test_gradient_shap_is_seeded_per_input_and_leaves_global_random_state(ctx) -> None:
    model = small_cnn()
    x, targets = torch.randn(4, 3, 12, 12), torch.tensor([0, 1, 2, 3])
    pool = torch.randn(30, 3, 12, 12)
    plugin = make(GradientShapAttributor, stdevs=0.1)
    np.random.seed(123)
    torch.manual_seed(321)
    numpy_before, torch_before = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    whole = plugin.attribute(model, x, targets, pool, ctx)
    assert np.array_equal(np.random.get_state()[1], numpy_before)
    assert torch.equal(torch.get_rng_state(), torch_before)
    assert torch.equal(whole, plugin.attribute(model, x, targets, pool, ctx))
    torch.manual_seed(7)  # the noise (torch's generator in Captum) is seeded by the run too
    assert torch.equal(whole, plugin.attribute(model, x, targets, pool, ctx))
    # an input's attribution does not depend on the batch around it
    assert torch.equal(plugin.attribute(model, x[2:3], targets[2:3], pool, ctx), whole[2:3])
    assert torch.equal(plugin.attribute(model, x.flip(0), targets.flip(0), pool, ctx), whole.flip(0))
    other = plugin.attribute(model, x, targets, pool, dataclasses.replace(ctx, seed=1))
    assert not torch.equal(other, whole)
    # without noise, what is drawn is the baselines and the points between them and the input
    # (numpy's generator in Captum): seeded by the run, not by whatever the global state was
    noiseless = make(GradientShapAttributor)
    np.random.seed(1)
    first = noiseless.attribute(model, x, targets, pool, ctx)
    np.random.seed(2)
    assert torch.equal(noiseless.attribute(model, x, targets, pool, ctx), first)
    assert not torch.equal(noiseless.attribute(model, x, targets, pool, dataclasses.replace(ctx, seed=1)), first)


def test_gradient_shap_background_errors(ctx) -> None:
    plugin = make(GradientShapAttributor)
    with pytest.raises(ValueError, match="background_size is 25"):
        plugin.attribute(small_cnn(), torch.randn(1, 3, 12, 12), torch.tensor([0]), torch.randn(5, 3, 12, 12), ctx)
    bg = plugin.draw_background(torch.randn(40, 3, 12, 12), ctx)
    assert bg.shape == (25, 3, 12, 12)


# -- Grad-CAM -------------------------------------------------------------------------------------


def grad_cam_twin(model: nn.Module, layer: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Grad-CAM by hand: the layer's output A, the target logit's gradient G on it, map =
    sum_k mean_hw(G_k) A_k, at the layer's resolution [B, 1, h, w]."""
    kept = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: kept.setdefault("a", out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), kept["a"])
    alpha = grad.mean(dim=(2, 3), keepdim=True)
    return (alpha * kept["a"]).sum(dim=1, keepdim=True).detach()


@pytest.mark.parametrize("layer", ["features.0", "features.2"])
def test_grad_cam_matches_a_plain_autograd_twin(layer, ctx) -> None:
    model = small_cnn(channels=(4, 6, 8), size=16)
    x, targets = torch.randn(3, 3, 16, 16), torch.tensor([4, 0, 2])
    attr = make(GradCamAttributor, layer=layer, upsample="nearest").attribute(model, x, targets, x, ctx)
    cam = grad_cam_twin(model, model.get_submodule(layer), x, targets)
    expected = torch.nn.functional.interpolate(cam, size=(16, 16), mode="nearest")
    # spread evenly over the three input channels: the channel sum is the map
    torch.testing.assert_close(attr.sum(1, keepdim=True), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attr[:, 0], attr[:, 2])
    bilinear = make(GradCamAttributor, layer=layer).attribute(model, x, targets, x, ctx)
    torch.testing.assert_close(
        bilinear.sum(1, keepdim=True),
        torch.nn.functional.interpolate(cam, size=(16, 16), mode="bilinear", align_corners=False),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip


def test_grad_cam_defaults_to_the_last_conv_layer_and_keeps_negative_evidence(ctx) -> None:
    model = small_cnn(channels=(4, 6, 8), size=16)
    assert conv_layer_names(model) == ["features.0", "features.2", "features.4"]
    x, targets = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 0])
    default = make(GradCamAttributor).attribute(model, x, targets, x, ctx)
    torch.testing.assert_close(default, make(GradCamAttributor, layer="features.4").attribute(model, x, targets, x, ctx))
    # nearest-neighbour upsampling commutes with the ReLU, so the two maps compare pixel by pixel
    signed = make(GradCamAttributor, layer="features.0", upsample="nearest").attribute(model, x, targets, x, ctx)
    assert (signed < 0).any()  # evidence against the class, for segmenter.effect = "negative"
    relu = make(GradCamAttributor, layer="features.0", upsample="nearest", relu_attributions=True).attribute(
        model, x, targets, x, ctx
    )
    assert (relu >= 0).all()
    torch.testing.assert_close(relu, signed.clamp_min(0), rtol=0, atol=1e-6)


def test_grad_cam_layer_errors_name_the_layer_and_the_candidates(ctx) -> None:
    model = small_cnn()
    x = torch.randn(2, 3, 12, 12)
    with pytest.raises(ValueError) as info:
        make(GradCamAttributor, layer="features.7").attribute(model, x, torch.tensor([0, 1]), x, ctx)
    message = str(info.value)
    assert "attributor.layer = 'features.7'" in message and "no layer of that name" in message
    assert "conv layers of SmallCnn: features.0, features.2" in message
    assert make(GradCamAttributor, layer="features.7").check_model(model) == [message]
    assert make(GradCamAttributor, layer="features.2").check_model(model) == []

    mlp = Mlp((3, 12, 12), 5, [8]).eval()
    problems = make(GradCamAttributor).check_model(mlp)
    assert len(problems) == 1 and "conv layers of Mlp: none" in problems[0] and '"cnn"' in problems[0]
    with pytest.raises(ValueError, match="its output has no spatial dimensions"):
        make(GradCamAttributor, layer="head").attribute(model, x, torch.tensor([0, 1]), x, ctx)


def test_grad_cam_lists_the_deepest_conv_layers_of_a_resnet(ctx) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    problems = make(GradCamAttributor, layer="layer9").check_model(model)
    assert "(the last 12 of 20)" in problems[0] and problems[0].endswith("layer4.1.conv1, layer4.1.conv2")
    # Grad-CAM takes plain gradients: the ReLU reused inside every block is no trap here
    x = torch.randn(2, 3, 64, 64)
    attr = make(GradCamAttributor, layer="layer3").attribute(model, x, torch.tensor([0, 2]), x, ctx)
    cam = grad_cam_twin(model, model.layer3, x, torch.tensor([0, 2]))
    expected = torch.nn.functional.interpolate(cam, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(attr.sum(1, keepdim=True), expected, rtol=1e-4, atol=1e-6)
    assert model.layer1[0].relu.inplace


# -- inside a pipeline run ----------------------------------------------------------------------

PIPELINE = """
[run]
seed = 0
device = "cpu"
cache_dir = "{cache}"

[dataset]
plugin = "toy"

[model]
plugin = "cnn"
channels = [4, 8]

[train]
epochs = 2
batch_size = 16

[selection]
n = 6

[attributor]
plugin = "{attributor}"
{attributor_options}

[segmenter]
plugin = "ppeps-wgm"
num_clusters = 3
effect = "absolute"

[critic]
plugin = "oracle"

[judge]
plugin = "rules"

[aligner]
plugin = "toy"

[evaluators.standard]
plugin = "standard"
alignment_score_samples = 8

[report]
enabled = false
"""


@pytest.fixture
def toy_registry():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
    import pipeline_toys

    from lvlmva.plugins import lvlmva_register
    from lvlmva.registry import PluginRegistry

    registry = PluginRegistry()
    lvlmva_register(registry)
    pipeline_toys.lvlmva_register(registry=registry)
    return registry


@pytest.mark.parametrize(
    ("name", "options", "same", "different"),
    [
        ("integrated-gradients", "n_steps = 8", "n_steps = 8\nbatch_size = 1", "n_steps = 9"),
        ("gradient-shap", "background_size = 4\nn_samples = 3", None, "background_size = 4\nn_samples = 4"),
        ("grad-cam", 'layer = "features.0"', 'layer = "features.0"\nbatch_size = 2', 'layer = "features.2"'),
    ],
)
def test_pipeline_runs_each_attributor_and_fingerprints_what_changes_it(tmp_path, toy_registry, name, options, same, different):
    from lvlmva.pipeline import Pipeline
    from lvlmva.settings import load_settings

    def run(extra: str) -> dict[str, str]:
        path = tmp_path / "s.toml"
        path.write_text(PIPELINE.format(cache=(tmp_path / "cache").as_posix(), attributor=name, attributor_options=extra))
        settings = load_settings(path, environ={}, registry=toy_registry)
        pipe = Pipeline(settings, tmp_path / "run", registry=toy_registry, echo=lambda _m: None)
        results = pipe.run()
        assert results["evaluations"]["standard"]["models"]["aligned"]["alignment_score"] is not None
        return {k: o.status for k, o in pipe.outcomes.items()}

    first = run(options)
    assert first["attribute"] == first["segment"] == "computed"
    from lvlmva.pipeline import open_run

    seg = open_run(tmp_path / "run").load("segment")
    assert seg.effect == "absolute" and seg.labels.shape == (6, 8, 8)
    if same is not None:
        assert run(same)["attribute"] == "reused"
    assert run(different)["attribute"] == "computed"


@pytest.mark.gpu
@pytest.mark.parametrize("name", ATTRIBUTORS)
def test_cuda_matches_cpu(name, ctx) -> None:
    model = small_cnn()
    x, pool = torch.randn(3, 3, 12, 12), torch.randn(30, 3, 12, 12)
    targets = torch.tensor([0, 2, 4])
    plugin = make(ATTRIBUTORS[name])
    cpu = plugin.attribute(model, x, targets, pool, ctx)
    gpu = plugin.attribute(model, x, targets, pool, dataclasses.replace(ctx, device=torch.device("cuda")))
    assert gpu.device.type == "cpu" and next(model.parameters()).device.type == "cpu"
    # GradientSHAP without noise (stdevs = 0) draws from numpy only: the same draws on both
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-3)
