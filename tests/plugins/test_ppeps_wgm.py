"""PPEPS-WGM: weighted EM against a plain numpy reference, and the segmenter's contract."""

from __future__ import annotations

import dataclasses

import numpy as np
import pydantic
import pytest
import torch

from lvlmva.plugins.segmenters.ppeps_wgm import (
    PpepsWgmSegmenter,
    default_reg_covar,
    fit_weighted_gmm,
    gmm_log_density,
    kmeans_plus_plus_init,
    pixel_coordinates,
    pixel_weights,
)
from lvlmva.protocols import Segmenter


def reference_weighted_em(
    coords: np.ndarray, weights: np.ndarray, init_means: np.ndarray, iters: int, reg: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """One image, textbook weighted EM: hard assignment to the initial means, then ``iters``
    rounds of M-step + E-step; returns the parameters and the log-likelihood per unit weight."""
    w = weights / weights.sum()
    j = init_means.shape[0]
    d2 = ((coords[:, None, :] - init_means[None]) ** 2).sum(-1)
    resp = np.eye(j)[d2.argmin(1)]

    def m_step(resp):
        nk = (w[:, None] * resp).sum(0)
        means = (w[:, None] * resp).T @ coords / nk[:, None]
        covs = np.empty((j, 2, 2))
        for k in range(j):
            diff = coords - means[k]
            covs[k] = (w * resp[:, k] * diff.T) @ diff / nk[k] + reg * np.eye(2)
        return means, covs, nk / nk.sum()

    def log_joint(means, covs, pis):
        out = np.empty((coords.shape[0], j))
        for k in range(j):
            diff = coords - means[k]
            prec = np.linalg.inv(covs[k])
            maha = np.einsum("ni,ij,nj->n", diff, prec, diff)
            out[:, k] = (
                np.log(pis[k])
                - np.log(2 * np.pi)
                - 0.5 * np.log(np.linalg.det(covs[k]))
                - 0.5 * maha
            )
        return out

    means, covs, pis = m_step(resp)
    for _ in range(iters):
        lj = log_joint(means, covs, pis)
        lse = np.logaddexp.reduce(lj, axis=1)
        resp = np.exp(lj - lse[:, None])
        means, covs, pis = m_step(resp)
    lj = log_joint(means, covs, pis)
    ll = float((w * np.logaddexp.reduce(lj, axis=1)).sum())
    order = np.argsort(-pis, kind="stable")
    return means[order], covs[order], pis[order], ll


def blob_map(
    centres: list[tuple[float, float]], masses: list[float], size: int = 28, sigma: float = 1.5
) -> torch.Tensor:
    """A [1, 1, size, size] map with Gaussian bumps of the given total masses, cut off at 3 sigma."""
    r, c = torch.meshgrid(
        torch.arange(size, dtype=torch.float64),
        torch.arange(size, dtype=torch.float64),
        indexing="ij",
    )
    out = torch.zeros(size, size, dtype=torch.float64)
    for (cr, cc), mass in zip(centres, masses, strict=True):
        d2 = (r - cr) ** 2 + (c - cc) ** 2
        bump = torch.exp(-d2 / (2 * sigma**2)) * (d2 <= (3 * sigma) ** 2)
        out += mass * bump / bump.sum()
    return out.to(torch.float32)[None, None]


def test_em_matches_numpy_reference(rng: np.random.Generator) -> None:
    b, h, w, j, iters = 3, 12, 10, 3, 15
    raw = rng.normal(size=(b, 1, h, w)).astype(np.float32)
    weights = pixel_weights(torch.from_numpy(raw))
    coords = pixel_coordinates(h, w)
    reg = default_reg_covar(h, w)
    means0, alive = kmeans_plus_plus_init(coords, weights, j, torch.Generator().manual_seed(3))
    assert alive.all()
    fit = fit_weighted_gmm(
        coords,
        weights,
        j,
        torch.Generator(),
        max_iter=iters,
        tol=0.0,
        reg_covar=reg,
        init_means=means0,
    )
    for i in range(b):
        means, covs, pis, ll = reference_weighted_em(
            coords.numpy(), weights[i].numpy(), means0[i].numpy(), iters, reg
        )
        assert fit.log_likelihood[i].item() == pytest.approx(ll, abs=1e-10)
        np.testing.assert_allclose(fit.pis[i].numpy(), pis, atol=1e-10)
        np.testing.assert_allclose(fit.means[i].numpy(), means, atol=1e-10)
        np.testing.assert_allclose(fit.covs[i].numpy(), covs, atol=1e-10)


def test_log_density_is_a_normalised_gaussian() -> None:
    # Closed-form 2 x 2 algebra against torch's own multivariate normal.
    means = torch.tensor([[[0.3, 0.6], [0.7, 0.2]]], dtype=torch.float64)
    covs = torch.tensor(
        [[[[0.02, 0.005], [0.005, 0.01]], [[0.03, -0.01], [-0.01, 0.04]]]], dtype=torch.float64
    )
    pis = torch.tensor([[0.25, 0.75]], dtype=torch.float64)
    z = torch.rand(50, 2, dtype=torch.float64)
    got = gmm_log_density(z, means, covs, pis)[0]
    for k in range(2):
        dist = torch.distributions.MultivariateNormal(means[0, k], covs[0, k])
        torch.testing.assert_close(got[:, k], dist.log_prob(z) + pis[0, k].log())


def test_em_increases_likelihood_and_stops_on_tolerance(rng: np.random.Generator) -> None:
    weights = pixel_weights(torch.from_numpy(rng.normal(size=(4, 1, 16, 16)).astype(np.float32)))
    coords = pixel_coordinates(16, 16)

    def fit(max_iter: int, tol: float):
        return fit_weighted_gmm(
            coords, weights, 4, torch.Generator().manual_seed(0), max_iter=max_iter, tol=tol
        )

    lls = [fit(it, 0.0).log_likelihood for it in (0, 5, 20, 150)]
    # reg_covar makes the M-step a slightly regularised maximiser, so allow rounding-size dips.
    for before, after in zip(lls, lls[1:], strict=False):
        assert (after >= before - 1e-9).all()
    # Where the seeded fit starts and ends (float64 EM, pinned from one CPU run): each image
    # gains 0.04 to 0.11 in log-likelihood per unit weight.
    torch.testing.assert_close(
        lls[0],
        torch.tensor([-0.257239, -0.313778, -0.228307, -0.240244], dtype=torch.float64),
        atol=1e-6,
        rtol=0,
    )
    torch.testing.assert_close(
        lls[-1],
        torch.tensor([-0.147560, -0.220737, -0.181545, -0.141925], dtype=torch.float64),
        atol=1e-6,
        rtol=0,
    )
    # A loose tolerance stops early, a little below where a long run ends.
    early = fit(150, 1e-5).log_likelihood
    assert (early < lls[-1]).any()
    torch.testing.assert_close(early, lls[-1], atol=1e-3, rtol=0)


def test_segmenter_recovers_blobs(ctx) -> None:
    centres = [(5.0, 6.0), (20.0, 8.0), (14.0, 21.0)]
    masses = [0.5, 0.3, 0.2]
    attributions = blob_map(centres, masses)
    seg = PpepsWgmSegmenter(PpepsWgmSegmenter.Options(num_clusters=3)).segment(attributions, ctx)
    # Cluster 0 = largest share: the clusters come out in the order of the blob masses.
    np.testing.assert_allclose(seg.shares[0].numpy(), masses, atol=1e-3)
    r, c = torch.meshgrid(torch.arange(28), torch.arange(28), indexing="ij")
    for k, (cr, cc) in enumerate(centres):
        near = (r - cr) ** 2 + (c - cc) ** 2 <= 9
        assert (seg.labels[0][near] == k).all(), f"blob {k} not in cluster {k}"
    assert seg.labels.shape == (1, 28, 28) and seg.labels.dtype == torch.int64
    assert not seg.degenerate[0]


def test_every_pixel_is_labelled_by_its_most_responsible_cluster(ctx) -> None:
    attributions = blob_map([(4.0, 4.0), (23.0, 23.0)], [0.6, 0.4])
    seg = PpepsWgmSegmenter(PpepsWgmSegmenter.Options(num_clusters=2)).segment(attributions, ctx)
    # Zero-weight corners far from both blobs still follow the nearer blob.
    assert seg.labels[0, 0, 0] == 0 and seg.labels[0, 27, 27] == 1
    assert seg.labels[0, 1, 3] == 0 and seg.labels[0, 26, 24] == 1


@pytest.mark.parametrize("fill", [0.0, -1.0])
def test_map_without_positive_attribution_is_degenerate(ctx, fill: float) -> None:
    attributions = torch.full((2, 3, 9, 7), fill)
    seg = PpepsWgmSegmenter(PpepsWgmSegmenter.Options(num_clusters=4)).segment(attributions, ctx)
    assert seg.degenerate.tolist() == [True, True]
    assert (seg.labels == 0).all()
    assert seg.shares.tolist() == [[1.0, 0.0, 0.0, 0.0]] * 2
    assert seg.log_likelihood.tolist() == [0.0, 0.0]


def test_fewer_positive_pixels_than_clusters(ctx) -> None:
    attributions = torch.zeros(1, 1, 10, 10)
    attributions[0, 0, 1, 1] = 3.0
    attributions[0, 0, 8, 7] = 1.0
    seg = PpepsWgmSegmenter(PpepsWgmSegmenter.Options(num_clusters=5)).segment(attributions, ctx)
    assert torch.isfinite(seg.shares).all() and torch.isfinite(seg.log_likelihood).all()
    np.testing.assert_allclose(seg.shares[0].numpy(), [0.75, 0.25, 0, 0, 0], atol=1e-9)
    assert seg.labels[0, 1, 1] == 0 and seg.labels[0, 8, 7] == 1
    assert set(seg.labels.unique().tolist()) == {0, 1}
    assert not seg.degenerate[0]


def test_channels_are_summed(ctx) -> None:
    # Channels that cancel where summed leave only the summed positive part.
    colour = torch.zeros(1, 3, 28, 28)
    colour[0, 0] = blob_map([(6.0, 6.0)], [1.0])[0, 0] * 2
    colour[0, 1] = -blob_map([(6.0, 6.0)], [1.0])[0, 0]
    colour[0, 2] = blob_map([(20.0, 20.0)], [1.0])[0, 0]
    weights = pixel_weights(colour)
    expected = colour.double().sum(1).flatten(1).clamp_min(0)
    torch.testing.assert_close(weights, expected * 784 / expected.sum())
    seg = PpepsWgmSegmenter(PpepsWgmSegmenter.Options(num_clusters=2)).segment(colour, ctx)
    np.testing.assert_allclose(seg.shares[0].numpy(), [0.5, 0.5], atol=1e-3)
    assert seg.labels[0, 6, 6] != seg.labels[0, 20, 20]


def test_seeded_determinism(ctx) -> None:
    attributions = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(9))
    seg = PpepsWgmSegmenter(PpepsWgmSegmenter.Options())
    first, second = seg.segment(attributions, ctx), seg.segment(attributions, ctx)
    for f in dataclasses.fields(first):
        a, b = getattr(first, f.name), getattr(second, f.name)
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    other = dataclasses.replace(ctx, seed=1)
    changed = seg.segment(attributions, other)
    assert not torch.equal(changed.labels, first.labels)


def test_batch_equals_per_image(ctx) -> None:
    g = torch.Generator().manual_seed(11)
    few = torch.zeros(1, 1, 28, 28)
    few[0, 0, 3, 3], few[0, 0, 20, 10] = 1.0, 2.0
    images = torch.cat(
        [
            blob_map([(5.0, 6.0), (20.0, 8.0)], [0.7, 0.3]),
            torch.zeros(1, 1, 28, 28),
            torch.randn(1, 1, 28, 28, generator=g),
            few,
            torch.randn(1, 1, 28, 28, generator=g).clamp_max(0.0)
            + (torch.rand(1, 1, 28, 28, generator=g) > 0.97),
        ]
    )
    seg = PpepsWgmSegmenter(PpepsWgmSegmenter.Options())
    batch = seg.segment(images, ctx)
    for i in range(images.shape[0]):
        one = seg.segment(images[i : i + 1], ctx)
        assert torch.equal(one.labels[0], batch.labels[i]), f"image {i}"
        assert torch.equal(one.degenerate[0], batch.degenerate[i])
        torch.testing.assert_close(one.shares[0], batch.shares[i], atol=1e-6, rtol=0)
        torch.testing.assert_close(
            one.log_likelihood[0], batch.log_likelihood[i], atol=1e-9, rtol=0
        )


def test_shares_are_sorted_and_sum_to_one(ctx) -> None:
    attributions = torch.randn(8, 1, 20, 20, generator=torch.Generator().manual_seed(2))
    seg = PpepsWgmSegmenter(PpepsWgmSegmenter.Options(num_clusters=6)).segment(attributions, ctx)
    assert seg.shares.dtype == torch.float32 and seg.log_likelihood.dtype == torch.float64
    assert (seg.shares[:, :-1] >= seg.shares[:, 1:]).all()
    torch.testing.assert_close(seg.shares.sum(1), torch.ones(8))
    assert seg.labels.min() >= 0 and seg.labels.max() < 6


def test_options_and_protocol() -> None:
    assert isinstance(PpepsWgmSegmenter(PpepsWgmSegmenter.Options()), Segmenter)
    opts = PpepsWgmSegmenter.Options()
    assert (opts.num_clusters, opts.max_iter, opts.reg_covar) == (5, 100, None)
    with pytest.raises(pydantic.ValidationError):
        PpepsWgmSegmenter.Options(clusters=3)
    with pytest.raises(pydantic.ValidationError):
        PpepsWgmSegmenter.Options(reg_covar=0.0)
    for name, field in PpepsWgmSegmenter.Options.model_fields.items():
        assert field.description, name


def test_non_finite_attributions_are_rejected(ctx) -> None:
    attributions = torch.ones(2, 1, 5, 5)
    attributions[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        PpepsWgmSegmenter(PpepsWgmSegmenter.Options()).segment(attributions, ctx)


def test_default_reg_covar_is_pixel_cell_variance() -> None:
    assert default_reg_covar(28, 28) == pytest.approx((1 / 27) ** 2 / 12)


@pytest.mark.gpu
def test_cuda_matches_cpu(ctx) -> None:
    attributions = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    seg = PpepsWgmSegmenter(PpepsWgmSegmenter.Options())
    cpu = seg.segment(attributions, ctx)
    gpu = seg.segment(attributions, dataclasses.replace(ctx, device=torch.device("cuda")))
    assert (cpu.labels == gpu.labels).float().mean() > 0.99
    torch.testing.assert_close(cpu.log_likelihood, gpu.log_likelihood, atol=1e-6, rtol=0)
