"""Tests of the XIL aligners rbr, rrr-gradcam, hint, cdep and ce.

Each loss is checked against a hand computation of its formula (numpy, float64, the closed
forms written out in the helpers below) to 1e-6, and each aligner, on planted-spurious data,
moves attribution off the planted region by a margin the test states."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lvlmva.plugins.aligners.cdep import (
    CdepAligner,
    CdepOptions,
    cdep_loss,
    contextual_decomposition,
    decomposable_layers,
)
from lvlmva.plugins.aligners.ce import CeAligner, CeOptions, ce_loss, make_counterexamples
from lvlmva.plugins.aligners.hint import HintAligner, HintOptions, hint_loss
from lvlmva.plugins.aligners.rbr import RbrAligner, RbrOptions, rbr_loss
from lvlmva.plugins.aligners.rrr_gradcam import (
    RrrGradCamAligner,
    RrrGradCamOptions,
    rrr_gradcam_loss,
)
from lvlmva.plugins.aligners.xil import grad_cam, mask_at, min_max_normalise, nearest_cells
from lvlmva.plugins.models.cnn import SmallCnn
from lvlmva.plugins.models.mlp import Mlp
from lvlmva.protocols import Aligner, check_capabilities
from lvlmva.records import AlignmentSet, TrainedModel
from lvlmva.testing.data import planted_spurious_dataset
from lvlmva.training import AlignmentOptions, LossAligner

ALIGNERS = {
    "rbr": (RbrAligner, RbrOptions),
    "rrr-gradcam": (RrrGradCamAligner, RrrGradCamOptions),
    "hint": (HintAligner, HintOptions),
    "cdep": (CdepAligner, CdepOptions),
    "ce": (CeAligner, CeOptions),
}

# -- numpy references ---------------------------------------------------------------------------


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: int, pad: int) -> np.ndarray:
    """``x`` ``[C, H, W]``, ``w`` ``[O, C, k, k]``: the cross-correlation a Conv2d computes."""
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    k = w.shape[-1]
    h, wd = (xp.shape[1] - k) // stride + 1, (xp.shape[2] - k) // stride + 1
    out = np.empty((w.shape[0], h, wd))
    for i in range(h):
        for j in range(wd):
            patch = xp[:, i * stride : i * stride + k, j * stride : j * stride + k]
            out[:, i, j] = (w * patch).sum(axis=(1, 2, 3))
    return out if b is None else out + b[:, None, None]


def normalise(m: np.ndarray) -> np.ndarray:
    shifted = m - m.min()
    return shifted / (shifted.max() + 1e-6)


def numpy_rbr(W, c, V, bias, x, y, a, lam):
    """RBR of ``logits = V tanh(W x + c) + bias`` in closed form, per sample (``x``, ``a``
    ``[N, D]``).

    With ``h = tanh(W x + c)``, ``g = 1 - h^2``, ``p = softmax(z)``, ``e = p - onehot(y)`` and
    ``d = V^T e``: the parameter gradient's entries sum to ``s = u (sum_j x_j + 1)`` with
    ``u = sum_i g_i d_i`` (V's and the bias's sum to 0, since ``sum_k e_k = 0``), so
    ``ds/dx = (sum_j x_j + 1) du/dx + u``, ``du/dx = W^T (-2 h g d + g V^T S V g)`` with
    ``S = diag(p) - p p^T``; the input gradient of ``sum_k log p_k`` is
    ``W^T (g V^T (1 - K p))``."""
    k = V.shape[0]
    ces, pens = [], []
    for xn, yn, an in zip(x, y, a, strict=True):
        h = np.tanh(W @ xn + c)
        g = 1.0 - h**2
        p = softmax(V @ h + bias)
        e = p.copy()
        e[yn] -= 1.0
        d = V.T @ e
        u = (g * d).sum()
        s_matrix = np.diag(p) - np.outer(p, p)
        du = W.T @ (-2.0 * h * g * d + g * (V.T @ s_matrix @ V @ g))
        influence = (xn.sum() + 1.0) * du + u
        saliency = W.T @ (g * (V.T @ (1.0 - k * p)))
        pens.append(((an * influence * saliency) ** 2).sum())
        ces.append(-np.log(p[yn]))
    ce, pen = float(np.mean(ces)), float(np.mean(pens))
    return ce + lam * pen, ce, pen


def numpy_grad_cam(wc, bc, V, bias, x, choose):
    """Logits and Grad-CAM of the conv layer of ``conv(stride 2, pad 1) -> ReLU -> mean ->
    linear`` for one image ``x`` ``[1, H, W]``: the class logit's gradient on the conv output
    is ``V[c, k] * [A_k > 0] / (h w)``; its spatial mean weighs channel k."""
    A = conv2d(x, wc, bc, stride=2, pad=1)
    z = V @ np.maximum(A, 0).mean(axis=(1, 2)) + bias
    cls = choose(z)
    d_a = V[cls][:, None, None] * (A > 0) / A[0].size
    alpha = d_a.mean(axis=(1, 2))
    return z, (alpha[:, None, None] * A).sum(axis=0)


def cell_share(mask: np.ndarray, cell: int) -> np.ndarray:
    """The share of each ``cell x cell`` block that ``mask`` covers."""
    h, w = mask.shape
    return mask.reshape(h // cell, cell, w // cell, cell).mean(axis=(1, 3))


def upsample(m: np.ndarray, cell: int) -> np.ndarray:
    return np.kron(m, np.ones((cell, cell)))


def numpy_rrr_gradcam(wc, bc, V, bias, x, y, masks, lam, resolution):
    ces, pens = [], []
    for xn, yn, mn in zip(x, y, masks, strict=True):
        z, cam = numpy_grad_cam(wc, bc, V, bias, xn, np.argmax)
        s = normalise(cam)
        if resolution == "layer":
            pens.append(((cell_share(mn, 2) * s) ** 2).sum())
        else:
            pens.append(((mn * upsample(s, 2)) ** 2).sum())
        ces.append(-np.log(softmax(z)[yn]))
    ce, pen = float(np.mean(ces)), float(np.mean(pens))
    return ce + lam * pen, ce, pen


def numpy_hint(wc, bc, V, bias, x, y, relevant, lam, resolution, positive_only):
    ces, pens = [], []
    for xn, yn, rn in zip(x, y, relevant, strict=True):
        z, cam = numpy_grad_cam(wc, bc, V, bias, xn, lambda _z, yn=yn: yn)
        s = normalise(np.maximum(cam, 0) if positive_only else cam)
        if not rn.any():
            pens.append(0.0)  # no relevant region: nothing to reward
        elif resolution == "input":
            pens.append(((upsample(s, 2) - rn) ** 2).sum())
        else:
            pens.append(((s - cell_share(rn, 2)) ** 2).sum())
        ces.append(-np.log(softmax(z)[yn]))
    ce, pen = float(np.mean(ces)), float(np.mean(pens))
    return ce + lam * pen, ce, pen


def split_bias(rel, irrel, bias):
    size_rel, size_irrel = np.abs(rel) + 1e-20, np.abs(irrel) + 1e-20
    share = size_rel / (size_rel + size_irrel)
    return rel + share * bias, irrel + (1.0 - share) * bias


def numpy_cd_mlp(W1, b1, W2, b2, rel, irrel):
    """Contextual decomposition of ``Linear -> ReLU -> Linear`` (flattened inputs)."""
    rel, irrel = split_bias(W1 @ rel, W1 @ irrel, b1)
    rel, irrel = np.maximum(rel, 0), np.maximum(rel + irrel, 0) - np.maximum(rel, 0)
    return split_bias(W2 @ rel, W2 @ irrel, b2)


def numpy_cd_cnn(wc, bc, V, bias, rel, irrel):
    """Contextual decomposition of ``Conv2d(stride 2, pad 1) -> ReLU -> mean -> Linear``."""
    rel, irrel = split_bias(
        conv2d(rel, wc, None, 2, 1), conv2d(irrel, wc, None, 2, 1), bc[:, None, None]
    )
    rel, irrel = np.maximum(rel, 0), np.maximum(rel + irrel, 0) - np.maximum(rel, 0)
    rel, irrel = rel.mean(axis=(1, 2)), irrel.mean(axis=(1, 2))
    return split_bias(V @ rel, V @ irrel, bias)


def numpy_cdep(decompose, logits, x, y, masks, lam):
    """CDEP: the masked region's softmax share of each logit, mean over classes, summed over the
    samples with a mask and divided by the batch size; cross entropy of ``logits``."""
    n = x.shape[0]
    penalty = 0.0
    for xn, mn in zip(x, masks, strict=True):
        if mn.any():
            beta, gamma = decompose(mn * xn, (1 - mn) * xn)
            penalty += (np.exp(beta) / (np.exp(beta) + np.exp(gamma))).mean()
    ce = float(-np.log(softmax(logits)[np.arange(n), y]).mean())
    return ce + lam * penalty / n, ce, penalty / n


# -- tiny models --------------------------------------------------------------------------------


def tanh_mlp(d: int, hidden: int, k: int) -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, k)).double()


def tiny_cnn(k: int = 4) -> nn.Sequential:
    """1 x 6 x 6 -> conv 3 channels, stride 2 -> 3 x 3 -> ReLU -> mean -> k logits."""
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, k),
    ).double()
    with torch.no_grad():
        model[0].bias.copy_(torch.tensor([0.3, -0.2, 0.1]))  # every channel has both signs
    return model


def cnn_params(model: nn.Sequential) -> tuple[np.ndarray, ...]:
    return tuple(p.detach().numpy() for p in (model[0].weight, model[0].bias, model[4].weight, model[4].bias))


def tiny_batch(rng, n: int = 6, channels: int = 1, side: int = 6, k: int = 4):
    x = torch.from_numpy(rng.normal(size=(n, channels, side, side)))
    y = torch.from_numpy(rng.integers(0, k, size=n))
    masks = torch.zeros(n, side, side, dtype=torch.bool)
    masks[0, :2, :2] = True  # one layer cell
    masks[1, 1:4, 2:5] = True  # parts of four cells
    masks[3] = torch.from_numpy(rng.random((side, side)) < 0.3)
    return x, y, masks  # rows 2, 4, 5: ordinary samples


# -- known answers ------------------------------------------------------------------------------


def test_rbr_loss_is_the_closed_form_of_a_tanh_network(rng):
    model = tanh_mlp(2 * 3 * 3, 5, 3)
    x, y, masks = tiny_batch(rng, n=5, channels=2, side=3, k=3)
    total, ce, penalty = rbr_loss(model, x, y, masks, lam=7.0)
    W, c, V, bias = (p.detach().numpy() for p in model.parameters())
    a = np.broadcast_to(masks.numpy()[:, None], x.shape).reshape(5, -1).astype(float)
    want = numpy_rbr(W, c, V, bias, x.numpy().reshape(5, -1), y.numpy(), a, 7.0)
    np.testing.assert_allclose([total.item(), ce.item(), penalty.item()], want, rtol=1e-6)
    assert penalty.item() > 1e-6


def test_rbr_penalty_is_the_typology_codes_times_the_batch_size(rng):
    """The typology code's steps on a batch whose every sample has a mask (its batches): the
    influence from the batch's mean cross entropy, the penalty summed over the batch. Ours,
    per sample and averaged, is B times that (the module docstring's reduction)."""
    model = tanh_mlp(9, 4, 3)
    x, y, _ = tiny_batch(rng, n=4, channels=1, side=3, k=3)
    masks = torch.from_numpy(rng.random((4, 3, 3)) < 0.5)
    masks[:, 0, 0] = True
    X = x.clone().requires_grad_(True)
    logits = model(X)
    ra_loss = F.cross_entropy(logits, y)
    grads = torch.autograd.grad(ra_loss, list(model.parameters()), create_graph=True)
    s = torch.cat([g.flatten() for g in grads]).sum()
    (influence,) = torch.autograd.grad(s, X, create_graph=True)
    log_p = F.log_softmax(logits, dim=1)
    (saliency,) = torch.autograd.grad(log_p, X, torch.ones_like(log_p), create_graph=True)
    typology = (masks.unsqueeze(1).double() * influence * saliency).square().sum()
    ours = rbr_loss(model, x, y, masks, 1.0)[2]
    torch.testing.assert_close(ours, 4 * typology, rtol=1e-9, atol=0)


def test_rbr_of_a_linear_softmax_model_is_zero(rng):
    """For ``softmax(W x + b)`` the parameter gradient's entries sum to 0 at every input (they
    hold ``sum_k (p_k - e_yk) = 0``): the influence saliency vanishes, only the cross entropy
    is left."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(9, 3)).double()
    x, y, masks = tiny_batch(rng, n=4, channels=1, side=3, k=3)
    total, ce, penalty = rbr_loss(model, x, y, masks, 1e6)
    assert abs(penalty.item()) < 1e-20
    torch.testing.assert_close(total, F.cross_entropy(model(x), y))


@pytest.mark.parametrize("resolution", ["layer", "input"])
def test_rrr_gradcam_loss_is_the_hand_computed_grad_cam_penalty(rng, resolution):
    model = tiny_cnn()
    x, y, masks = tiny_batch(rng)
    total, ce, penalty = rrr_gradcam_loss(model, model[0], x, y, masks, 3.0, resolution=resolution)
    want = numpy_rrr_gradcam(
        *cnn_params(model), x.numpy(), y.numpy(), masks.numpy().astype(float), 3.0, resolution
    )
    np.testing.assert_allclose([total.item(), ce.item(), penalty.item()], want, rtol=1e-6)
    assert penalty.item() > 1e-3


def test_grad_cam_is_captums_map_with_its_gradients(rng):
    """The map equals Captum's LayerGradCam (relu_attributions=False), the typology code's
    explainer, and so do its parameter gradients: the channel weights are constants. With
    differentiate_weights the map is the same number with more gradient."""
    from captum.attr import LayerGradCam

    model = tiny_cnn()
    x, y, _ = tiny_batch(rng)
    captum = LayerGradCam(model, model[0]).attribute(x, target=y, relu_attributions=False)
    _, ours = grad_cam(model, model[0], x, lambda _z: y)
    _, second = grad_cam(model, model[0], x, lambda _z: y, differentiate_weights=True)
    torch.testing.assert_close(ours, captum, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(second, captum, rtol=1e-12, atol=1e-12)
    params = list(model.parameters())
    want = torch.autograd.grad(captum.square().sum(), params, allow_unused=True)
    got = torch.autograd.grad(ours.square().sum(), params, allow_unused=True)
    full = torch.autograd.grad(second.square().sum(), params, allow_unused=True)
    for w, g in zip(want, got, strict=True):
        assert (w is None and g is None) or torch.allclose(w, g, rtol=1e-10, atol=1e-12)
    assert want[2] is None and full[2] is not None and full[2].abs().sum() > 0  # the head's weights


@pytest.mark.parametrize(("size", "cells"), [((6, 6), (3, 3)), ((7, 11), (3, 5)), ((5, 4), (5, 4))])
def test_nearest_cells_sum_what_upsampling_pairs_with_each_cell(size, cells):
    """Sums over pixels of a nearest-upsampled map against a mask, taken per cell, equal the
    sums over the upsampled map itself, sizes that do not divide included."""
    g = torch.Generator().manual_seed(0)
    values = torch.rand(3, *size, generator=g, dtype=torch.float64)
    saliency = torch.rand(3, 1, *cells, generator=g, dtype=torch.float64)
    up = F.interpolate(saliency, size=size, mode="nearest")
    sums, pixels = nearest_cells(values, cells)
    ones, _ = nearest_cells(torch.ones(1, *size, dtype=torch.float64), cells)
    torch.testing.assert_close(pixels.expand_as(ones), ones)
    assert int(pixels.sum()) == size[0] * size[1]
    torch.testing.assert_close((saliency * sums).sum(), (up * values.unsqueeze(1)).sum())
    squares, _ = nearest_cells(values.square(), cells)
    misfit = pixels * saliency.square() - 2 * saliency * sums + squares
    torch.testing.assert_close(misfit.sum(), (up - values.unsqueeze(1)).square().sum())


@pytest.mark.parametrize(
    ("resolution", "positive_only"), [("input", False), ("layer", False), ("input", True)]
)
def test_hint_loss_is_the_hand_computed_squared_difference(rng, resolution, positive_only):
    model = tiny_cnn()
    x, y, masks = tiny_batch(rng)
    relevant = ~masks
    relevant[[2, 5]] = False  # ordinary samples: no relevant region
    relevant[4] = False
    relevant[4, 3:, 3:] = True  # a region of its own, not the complement of a mask
    total, ce, penalty = hint_loss(
        model, model[0], x, y, relevant, 0.5, resolution=resolution, positive_only=positive_only
    )
    want = numpy_hint(
        *cnn_params(model), x.numpy(), y.numpy(), relevant.numpy().astype(float), 0.5,
        resolution, positive_only,
    )  # fmt: skip
    np.testing.assert_allclose([total.item(), ce.item(), penalty.item()], want, rtol=1e-6)
    assert penalty.item() > 1e-3


def test_cdep_loss_is_the_hand_computed_decomposition_of_an_mlp(rng):
    torch.manual_seed(2)
    model = Mlp((2, 3, 3), 3, [5]).double()
    x, y, masks = tiny_batch(rng, n=5, channels=2, side=3, k=3)
    total, ce, penalty = cdep_loss(model, x, y, masks, 4.0)
    W1, b1 = (p.detach().numpy() for p in model.features[1].parameters())
    W2, b2 = (p.detach().numpy() for p in model.head.parameters())
    a = np.broadcast_to(masks.numpy()[:, None], x.shape).reshape(5, -1).astype(float)
    want = numpy_cdep(
        lambda rel, irrel: numpy_cd_mlp(W1, b1, W2, b2, rel, irrel),
        model(x).detach().numpy(), x.numpy().reshape(5, -1), y.numpy(), a, 4.0,
    )  # fmt: skip
    np.testing.assert_allclose([total.item(), ce.item(), penalty.item()], want, rtol=1e-6)


def test_cdep_loss_is_the_hand_computed_decomposition_of_a_cnn(rng):
    model = tiny_cnn()
    x, y, masks = tiny_batch(rng)
    total, ce, penalty = cdep_loss(model, x, y, masks, 4.0)
    params = cnn_params(model)
    m = masks.numpy()[:, None].astype(float)
    want = numpy_cdep(
        lambda rel, irrel: numpy_cd_cnn(*params, rel, irrel),
        model(x).detach().numpy(), x.numpy(), y.numpy(), m, 4.0,
    )  # fmt: skip
    np.testing.assert_allclose([total.item(), ce.item(), penalty.item()], want, rtol=1e-6)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_the_decomposition_adds_up_to_the_logits(kind):
    """``beta + gamma = f(x)`` on the built-in models, for any split of the input."""
    torch.manual_seed(0)
    if kind == "mlp":
        model = Mlp((3, 8, 8), 5, [16, 8])
    else:
        model = SmallCnn((3, 8, 8), 5, [4, 6])
    x = torch.randn(4, 3, 8, 8)
    region = (torch.rand(4, 1, 8, 8) < 0.4).float()
    beta, gamma = contextual_decomposition(decomposable_layers(model), region * x, (1 - region) * x)
    torch.testing.assert_close(beta + gamma, model(x), rtol=1e-5, atol=1e-5)
    beta, gamma = contextual_decomposition(decomposable_layers(model), x, torch.zeros_like(x))
    torch.testing.assert_close(beta, model(x), rtol=1e-5, atol=1e-5)  # all of x relevant


def test_ce_loss_is_the_cross_entropy_over_the_batch_and_its_counterexamples(rng):
    """With a range of one value the counterexamples are known: each masked row, twice, its
    masked pixels set to that value, after the batch; the mean runs over all of them."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 9, 3)).double()
    x, y, masks = tiny_batch(rng, n=5, channels=2, side=3, k=3)
    total, ce, counter = ce_loss(model, x, y, masks, 2, value_range=(4.0, 4.0))
    W, b = (p.detach().numpy() for p in model.parameters())
    xn, mn = x.numpy(), masks.numpy()
    rows = [0, 0, 1, 1, 3, 3]
    extra = np.stack([np.where(mn[r][None], 4.0, xn[r]) for r in rows])
    every = np.concatenate([xn, extra]).reshape(11, -1)
    labels = np.concatenate([y.numpy(), y.numpy()[rows]])
    losses = -np.log(softmax(every @ W.T + b)[np.arange(11), labels])
    np.testing.assert_allclose(
        [total.item(), ce.item(), counter.item()],
        [losses.mean(), losses[:5].mean(), losses[5:].mean()],
        rtol=1e-10,
    )


def test_counterexamples_replace_the_masked_pixels_only(rng):
    x = torch.from_numpy(rng.normal(size=(6, 3, 5, 5))).float()
    x[:, 1] += 10.0  # a channel of its own range
    masks = torch.zeros(6, 5, 5, dtype=torch.bool)
    masks[1, :2, :3] = True
    masks[4, 3:, 3:] = True
    g = torch.Generator().manual_seed(0)
    extra, rows = make_counterexamples(x, masks, 3, generator=g)
    assert rows.tolist() == [1, 1, 1, 4, 4, 4]
    where = masks[rows].unsqueeze(1).expand_as(extra)
    assert torch.equal(extra[~where], x[rows][~where])
    low, high = x.amin(dim=(0, 2, 3)), x.amax(dim=(0, 2, 3))  # the batch's range per channel
    for c in range(3):
        drawn = extra[:, c][where[:, c]]
        assert bool((drawn >= low[c]).all() and (drawn <= high[c]).all())
    assert extra[:, 1][where[:, 1]].min() > 5  # drawn in channel 1's own range
    assert not torch.equal(extra[0], extra[1])  # each copy its own draw
    # the same generator state gives the same draws; a fixed range is used as given
    again, _ = make_counterexamples(x, masks, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, extra)
    fixed, _ = make_counterexamples(x, masks, 1, value_range=(0.0, 255.0), generator=g)
    assert fixed[where[::3]].max() > 20  # far outside the data's own range

    swapped, rows = make_counterexamples(x, masks, 4, strategy="other-sample", generator=g)
    for copy, row in zip(swapped, rows.tolist(), strict=True):
        region = masks[row]
        donors = [r for r in range(6) if torch.equal(copy[:, region], x[r][:, region])]
        assert donors and row not in donors
        assert torch.equal(copy[:, ~region], x[row][:, ~region])
    with pytest.raises(ValueError, match="two rows or more"):
        make_counterexamples(x[:1], masks[1:2], 1, strategy="other-sample")


# -- the plugins --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALIGNERS)
def test_every_aligner_is_a_documented_loss_aligner(name):
    cls, options = ALIGNERS[name]
    assert check_capabilities("aligner", cls) == []
    assert issubclass(cls, LossAligner) and issubclass(options, AlignmentOptions)
    assert isinstance(cls(options()), Aligner)
    assert cls.__doc__.splitlines()[0].strip() and cls.__module__.endswith(name.replace("-", "_"))
    own = [k for k in options.model_fields if k not in AlignmentOptions.model_fields]
    assert own and list(options.model_fields)[: len(own)] == own  # its own options first
    for key, field in options.model_fields.items():
        assert field.description, key
    assert cls.seed_name == name
    assert cls.needs_relevant is (name == "hint")
    with pytest.raises(ValueError):
        options(no_such_option=1)


@pytest.mark.parametrize("name", ["rbr", "rrr-gradcam", "hint", "cdep"])
def test_lam_takes_one_value_or_a_grid(name):
    _, options = ALIGNERS[name]
    assert options(lam=2).lam == 2.0 and options(lam=[1, 10]).lam == (1.0, 10.0)
    for bad in ([], -1.0, [1.0, -1.0]):
        with pytest.raises(ValueError, match="lam"):
            options(lam=bad)


def test_ce_options_are_checked():
    assert CeOptions(counterexamples=[1, 3]).counterexamples == (1, 3)
    for bad in (0, [], [1, 0]):
        with pytest.raises(ValueError, match="counterexamples"):
            CeOptions(counterexamples=bad)
    with pytest.raises(ValueError, match="low <= high"):
        CeOptions(value_range=(1.0, 0.0))
    with pytest.raises(ValueError):
        CeOptions(strategy="shuffle")


def test_models_are_checked_before_training():
    """Grad-CAM needs a conv layer (the mlp has none); CDEP decomposes the built-in mlp and
    cnn and Sequential chains of the layers it has rules for; RBR and CE take any model."""
    mlp, cnn = Mlp((1, 8, 8), 2, [8]), SmallCnn((1, 8, 8), 2, [4, 4])
    for name in ("rrr-gradcam", "hint"):
        cls, options = ALIGNERS[name]
        (problem,) = cls(options()).check_model(mlp)
        assert problem == (
            f"{name} explains a convolutional layer (Grad-CAM), and Mlp has no Conv2d layer: use "
            'a convolutional model (model.plugin = "cnn" or "resnet")'
        )
        assert cls(options()).check_model(cnn) == []
        assert cls(options(layer="features.0")).check_model(cnn) == []
        (problem,) = cls(options(layer="features.9")).check_model(cnn)
        assert "layer = 'features.9': SmallCnn has no layer of that name" in problem
        assert "its conv layers: features.0, features.2" in problem
    cdep = CdepAligner(CdepOptions())
    assert cdep.check_model(mlp) == [] and cdep.check_model(cnn) == []
    assert cdep.check_model(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 2))) == []
    (problem,) = cdep.check_model(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.MaxPool2d(2)))
    assert problem.startswith("cdep has no decomposition rule for 1 (BatchNorm2d), 2 (MaxPool2d)")
    from lvlmva.plugins.models.resnet import ResNetFactory, ResNetOptions

    resnet = ResNetFactory(ResNetOptions()).build((3, 32, 32), 2)
    (problem,) = cdep.check_model(resnet)
    assert "cdep decomposes the built-in mlp and cnn models and nn.Sequential chains" in problem
    assert type(resnet).__name__ in problem
    for name in ("rbr", "ce"):
        cls, options = ALIGNERS[name]
        assert not hasattr(cls, "check_model") or cls(options()).check_model(mlp) == []


# -- on planted-spurious data -------------------------------------------------------------------

PLANTED_OPTS = {"epochs": 10, "lr": 1e-2}


@pytest.fixture(scope="module")
def planted():
    """Two classes of 8 x 8 noise; a faint class pattern below a bright 2 x 2 patch whose
    column follows the class in 95 % of the training images and half of the test ones. Models
    trained on it lean on the patch: a quarter of their input-gradient x input mass lies on its
    4 of 64 pixels."""
    data = planted_spurious_dataset(
        train=[[190, 10], [10, 190]], test=[[100, 100], [100, 100]], core_signal=0.25, seed=0
    )
    models = {}
    for kind in ("mlp", "cnn"):
        torch.manual_seed(0)
        model = Mlp((1, 8, 8), 2, [32]) if kind == "mlp" else SmallCnn((1, 8, 8), 2, [16, 16])
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        order = torch.Generator().manual_seed(0)
        for _ in range(20):
            for idx in torch.randperm(400, generator=order).split(32):
                opt.zero_grad()
                F.cross_entropy(model(data.train.images[idx]), data.train.labels[idx]).backward()
                opt.step()
        models[kind] = model.eval()
    idx = torch.arange(32)
    masks = data.train.spurious_masks[idx]
    alignment = AlignmentSet(idx, torch.zeros(32), "random", relevant=~masks)
    return data, models, alignment, masks


def planted_share(model: nn.Module, data) -> float:
    """Mean over the test images of the share of |input gradient x input| (of the true class's
    log-probability) that lies on the planted patch."""
    x, y, region = data.test.images, data.test.labels, data.test.spurious_masks
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.log_softmax(model(xg), dim=1).gather(1, y[:, None]).sum(), xg)
    mass = (grad * x).abs().sum(dim=1)
    return float(((mass * region).flatten(1).sum(1) / mass.flatten(1).sum(1)).mean())


def grad_cam_share(model: nn.Module, data, classes) -> float:
    """Mean share of the [0, 1)-scaled Grad-CAM map of features.0 (4 x 4) on the patch."""
    x, y, region = data.test.images, data.test.labels, data.test.spurious_masks
    _, cam = grad_cam(model, model.features[0], x, lambda z: classes(z, y))
    saliency = min_max_normalise(cam.detach())
    weight = mask_at(region, tuple(cam.shape[-2:]))
    return float(((saliency * weight).flatten(1).sum(1) / saliency.flatten(1).sum(1)).mean())


def hint_misfit(model: nn.Module, data) -> float:
    """HINT's own measure: the mean squared difference between the upsampled, scaled Grad-CAM
    map of the true class and the region off the patch (everything relevant but the patch)."""
    x, y = data.test.images, data.test.labels
    relevant = ~data.test.spurious_masks
    penalty = hint_loss(model, model.features[0], x, y, relevant, 1.0)[2]
    return float(penalty.detach()) / 64


def cd_share(model: nn.Module, data) -> float:
    """CDEP's own measure: the patch's softmax share of the logits, mean over images and classes."""
    x, region = data.test.images, data.test.spurious_masks.unsqueeze(1).float()
    with torch.no_grad():
        beta, gamma = contextual_decomposition(
            decomposable_layers(model), region * x, (1 - region) * x
        )
        return float(torch.softmax(torch.stack([beta, gamma], -1), -1)[..., 0].mean())


def rbr_share(model: nn.Module, data) -> float:
    """RBR's own measure: the share of its saliency's mass (|influence gradient x input
    gradient|) on the patch."""
    x, y, region = data.test.images, data.test.labels, data.test.spurious_masks
    xg = x.clone().requires_grad_(True)
    logits = model(xg)
    grads = torch.autograd.grad(
        F.cross_entropy(logits, y, reduction="sum"), list(model.parameters()), create_graph=True
    )
    (influence,) = torch.autograd.grad(sum(g.sum() for g in grads), xg, retain_graph=True)
    (saliency,) = torch.autograd.grad(F.log_softmax(logits, 1).sum(), xg)
    mass = (influence * saliency).abs().sum(dim=1)
    return float(((mass * region).flatten(1).sum(1) / mass.flatten(1).sum(1)).mean())


def counterexample_shift(model: nn.Module, data) -> float:
    """CE's own measure: how far the predicted probabilities move when the patch is randomised
    (mean L1 distance over the test images)."""
    x, region = data.test.images, data.test.spurious_masks
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        randomised, _ = make_counterexamples(x, region, 1, generator=g)
        return float((F.softmax(model(x), 1) - F.softmax(model(randomised), 1)).abs().sum(1).mean())


# name -> (model, its options, its own measure, own after / before at most, the drop of the
# input-gradient x input share at least; None: no claim). Measured at these settings (torch
# 2.14, CPU), own and share before -> after:
#   rbr          own 0.067 -> 0.056   share 0.224 -> 0.201  (its saliency vanishes on the samples
#                the model fits, so the penalty empties fast and moves little; with all 400
#                training samples as alignment samples the share falls to 0.09)
#   cdep         own 0.510 -> 0.011   share 0.224 -> 0.183
#   ce           own 0.403 -> 0.300   share 0.224 -> 0.181
#   rrr-gradcam  own 0.042 -> 0.022   share 0.239 -> 0.212  (a 4 x 4 Grad-CAM map can be emptied
#                on the patch while the model still reads it: no input-gradient claim)
#   hint         own 0.315 -> 0.260   share 0.239 -> 0.196
PLANTED_CASES = {
    "rbr": ("mlp", {"lam": 1e5}, rbr_share, 0.9, 0.01),
    "cdep": ("mlp", {"lam": 100.0}, cd_share, 0.1, 0.02),
    "ce": ("mlp", {"counterexamples": 1}, counterexample_shift, 0.9, 0.02),
    "rrr-gradcam": (
        "cnn",
        {"lam": 10.0, "layer": "features.0"},
        lambda m, d: grad_cam_share(m, d, lambda z, _y: z.argmax(1)),
        0.7,
        None,
    ),
    "hint": ("cnn", {"lam": 1.0, "layer": "features.0"}, hint_misfit, 0.9, 0.02),
}


@pytest.mark.parametrize("name", PLANTED_CASES)
def test_alignment_moves_attribution_off_the_planted_patch(name, planted, ctx):
    data, models, alignment, masks = planted
    kind, options, own, own_ratio, share_drop = PLANTED_CASES[name]
    cls, opts = ALIGNERS[name]
    model = models[kind]
    aligned = cls(opts(**options, **PLANTED_OPTS)).align(model, data, alignment, masks, ctx)
    assert isinstance(aligned, nn.Module) and not isinstance(aligned, TrainedModel)
    before, after = own(model, data), own(aligned, data)
    share_before, share_after = planted_share(model, data), planted_share(aligned, data)
    assert share_before > 0.2  # the model leans on the patch (4 of 64 pixels)
    assert after <= own_ratio * before, (before, after)
    if share_drop is not None:
        assert share_after <= share_before - share_drop, (share_before, share_after)
    lines = [json.loads(x) for x in (ctx.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == list(range(1, 11))
    terms = {"ce", "ce_counter"} if name == "ce" else {"ce", "penalty"}
    assert all(set(line) == {"stage", "epoch", "loss", "steps", "seconds", *terms} for line in lines)


# -- in a pipeline run --------------------------------------------------------------------------

PIPELINE = """
[run]
seed = 0
device = "cpu"
cache_dir = "{cache}"

[dataset]
plugin = "toy"

[model]
plugin = "{model}"
{model_options}

[train]
epochs = 2
batch_size = 16

[selection]
n = 6

[attributor]
plugin = "toy"

[segmenter]
plugin = "toy"

[critic]
plugin = "toy"

[judge]
plugin = "toy"

[masks]
true_mask_reference = true

[aligners.rbr]
plugin = "rbr"
epochs = 1

[aligners.gradcam]
plugin = "rrr-gradcam"
layer = "features.0"
epochs = 1

[aligners.hint]
plugin = "hint"
epochs = 1

[aligners.cdep]
plugin = "cdep"
epochs = 1

[aligners.ce]
plugin = "ce"
epochs = 1

[evaluators.toy]
plugin = "toy"

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


def _settings(tmp_path, registry, model: str, model_options: str = ""):
    from lvlmva.settings import load_settings

    path = tmp_path / "s.toml"
    text = PIPELINE.format(cache=(tmp_path / "cache").as_posix(), model=model, model_options=model_options)
    path.write_text(text)
    return load_settings(path, environ={}, registry=registry)


def test_every_aligner_runs_in_one_pipeline_beside_the_others(tmp_path, toy_registry):
    """The five as named instances of one run on the cnn model: each aligns with the verdicts'
    masks and with the true masks (hint with the regions judged relevant, and everything off the
    true masks), and its terms reach metrics.jsonl under its own stage."""
    from lvlmva.pipeline import Pipeline

    settings = _settings(tmp_path, toy_registry, "cnn", "channels = [4, 8]")
    pipe = Pipeline(settings, tmp_path / "run", registry=toy_registry, echo=lambda _m: None)
    results = pipe.run()
    names = ("rbr", "gradcam", "hint", "cdep", "ce")
    statuses = {k: o.status for k, o in pipe.outcomes.items()}
    for name in names:
        assert statuses[f"align.{name}"] == statuses[f"reference.{name}"] == "computed"
    evaluated = results["evaluations"]["toy"]["models"]
    assert {f"{kind}.{n}" for kind in ("aligned", "true_mask") for n in names} <= set(evaluated)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    terms = {
        line["run_stage"]: sorted(set(line) - {"stage", "epoch", "steps", "seconds", "run_stage", "run_attempt"})
        for line in lines
        if line["stage"] == "align"
    }
    for name in names:
        own = ["ce", "ce_counter", "loss"] if name == "ce" else ["ce", "loss", "penalty"]
        assert terms[f"align.{name}"] == terms[f"reference.{name}"] == own


def test_aligners_that_cannot_read_the_model_stop_the_run_before_training(tmp_path, toy_registry):
    """On the toy MLP (no Conv2d, not a chain CDEP knows) rrr-gradcam, hint and cdep are refused
    with their reasons, exit 2, before the original model trains; rbr and ce take it."""
    from lvlmva.pipeline import ConfigurationError, Pipeline

    settings = _settings(tmp_path, toy_registry, "toy")
    pipe = Pipeline(settings, tmp_path / "run", registry=toy_registry, echo=lambda _m: None)
    with pytest.raises(ConfigurationError) as err:
        pipe.run()
    message = str(err.value)
    assert "[aligners.gradcam] rrr-gradcam: layer = 'features.0': ToyNet has no layer of that name" in message
    assert "[aligners.hint] hint explains a convolutional layer (Grad-CAM), and ToyNet has no Conv2d" in message
    assert "[aligners.cdep] cdep decomposes the built-in mlp and cnn models" in message
    assert "[aligners.rbr]" not in message and "[aligners.ce]" not in message
    assert not (tmp_path / "run" / "train").exists()


@pytest.mark.parametrize(("name", "grid"), [("hint", {"lam": [0.0, 1.0]}), ("ce", {"counterexamples": [1, 2]})])
def test_a_grid_is_chosen_on_validation_and_drawn_per_point(name, grid, planted, ctx):
    """A grid of the loss parameter goes through the trainer's grid: one alignment per value
    (hint with its relevant regions at every point), each a curve of the report with the
    aligner's terms, the first best by validation accuracy returned with its scores; the
    chosen model is the one a single fit with that value gives."""
    import dataclasses

    from lvlmva.report import read_training_curves

    data, models, alignment, masks = planted
    data = dataclasses.replace(data, val=data.test)  # a validation split to choose on
    cls, opts = ALIGNERS[name]
    kind = "cnn" if name == "hint" else "mlp"
    extra = {"layer": "features.0"} if name == "hint" else {}
    common = {"epochs": 2, "lr": 1e-2, **extra}
    result = cls(opts(**grid, **common)).align(models[kind], data, alignment, masks, ctx)
    assert isinstance(result, TrainedModel)
    (key, values), = grid.items()
    assert [row[key] for row in result.details["grid"]] == values
    accuracies = [row["val_accuracy"] for row in result.details["grid"]]
    best = max(range(len(values)), key=lambda i: (accuracies[i], -i))
    assert result.details["chosen"] == {key: values[best]}
    single = cls(opts(**{key: values[best]}, **common)).align(models[kind], data, alignment, masks, ctx)
    for a, b in zip(result.model.state_dict().values(), single.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    curves, _ = read_training_curves(ctx.run_dir)
    terms = ("ce", "ce_counter") if name == "ce" else ("ce", "penalty")
    assert [c.point for c in curves[: len(values)]] == [{key: v} for v in values]
    assert all(c.terms == terms for c in curves)
