"""PPEPS-WGM: Positive Predictive Effect Probabilistic Segmentation via Weighted Gaussian Mixtures.

An attribution map is summed over channels, cut to its positive part and normalised to shares
``p_i`` of the positive evidence. A J-component Gaussian mixture over the pixel coordinates
(scaled to [0, 1]) is fitted by weighted EM with pixel weights ``w_i = M p_i``; every pixel,
zero-weight ones too, is then assigned to its most responsible component (method.md 2.2).

Which effect is segmented is an option (``effect``): the positive part ``max(Phi, 0)`` (the
paper's, evidence for the class), the negative part ``max(-Phi, 0)`` (evidence against it) or
the magnitude ``|Phi|`` (both). Everything after that choice is the same: shares ``p_i`` of the
chosen effect, weights ``w_i = M p_i``, mixture weights ``pi_j`` = the share of that effect a
cluster holds. A shortcut that lowers its class's score (a dim decoy on DecoyMNIST, see
docs/results.md) carries negative attribution only, so only ``negative`` or ``absolute`` give it
a cluster of its own.

The EM is batched over images in torch (float64) and works on CPU and CUDA. Densities use the
closed-form inverse and determinant of 2 x 2 covariances, written as a quadratic form in the
features ``(1, x, y, x^2, xy, y^2)``: one batched matmul gives every log-density, and the same
features give every sufficient statistic of the M-step.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from pydantic import Field

from lvlmva.protocols import PluginOptions, RunContext
from lvlmva.records import EFFECTS, Segmentation

__all__ = [
    "PpepsWgmSegmenter",
    "WeightedGmmFit",
    "fit_weighted_gmm",
    "kmeans_plus_plus_init",
    "gmm_log_density",
    "pixel_coordinates",
    "pixel_weights",
    "effect_map",
    "default_reg_covar",
]

_LOG_2PI = math.log(2.0 * math.pi)
# A component whose weighted mass falls below this (as a share of the image's weight) is
# dropped: its mean and covariance would be 0/0.
_DEAD_SHARE = 1e-12


class WeightedGmmFit(NamedTuple):
    """A fitted mixture per image, components sorted by descending share.

    - ``means``: float64 ``[B, J, 2]`` (row, col) in [0, 1].
    - ``covs``: float64 ``[B, J, 2, 2]``.
    - ``pis``: float64 ``[B, J]``, mixture weights; 0 for components that hold no weight.
    - ``log_likelihood``: float64 ``[B]``, ``sum_i w_i log p(z_i) / sum_i w_i`` at the returned
      parameters (0 for an image without weight).
    """

    means: torch.Tensor
    covs: torch.Tensor
    pis: torch.Tensor
    log_likelihood: torch.Tensor


def default_reg_covar(height: int, width: int) -> float:
    """The variance of a uniform distribution over one pixel cell on the [0, 1] scale.

    Pixel coordinates lie on a grid, so a component can shrink onto one heavy pixel and its
    likelihood grows without bound as its variance goes to 0. Adding the variance of a pixel
    cell treats each pixel as a small square instead of a point, which keeps every component
    at least one pixel wide.
    """
    step = 1.0 / max(height - 1, width - 1, 1)
    return step * step / 12.0


def pixel_coordinates(height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float64 ``[H*W, 2]`` (row, col) of each pixel in row-major order, scaled to [0, 1]."""
    rows = torch.arange(height, dtype=torch.float64, device=device) / max(height - 1, 1)
    cols = torch.arange(width, dtype=torch.float64, device=device) / max(width - 1, 1)
    grid_r, grid_c = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([grid_r.reshape(-1), grid_c.reshape(-1)], dim=-1)


def effect_map(attributions: torch.Tensor, effect: str = "positive") -> torch.Tensor:
    """float64 ``[B, H*W]`` non-negative effect ``phi_i`` per pixel of maps ``[B, C, H, W]``.

    Channels are summed first (an RGB pixel is one location), then ``"positive"`` keeps
    ``max(Phi_i, 0)``, ``"negative"`` keeps ``max(-Phi_i, 0)`` and ``"absolute"`` takes ``|Phi_i|``.
    """
    if effect not in EFFECTS:
        raise ValueError(f"effect must be one of {', '.join(EFFECTS)}, got {effect!r}")
    if attributions.dim() != 4:
        raise ValueError(f"attributions must be [B, C, H, W], got {tuple(attributions.shape)}")
    if not torch.isfinite(attributions).all():
        bad = (~torch.isfinite(attributions)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"attributions contain NaN or inf (batch positions {bad})")
    signed = attributions.to(torch.float64).sum(dim=1).flatten(1)
    if effect == "positive":
        return signed.clamp_min(0.0)
    if effect == "negative":
        # where(), not neg().clamp_min(0): that leaves -0.0 where Phi is 0, and the GMM's seed
        # is drawn from the weights' bytes, so the mirrored map would not segment the same
        return torch.where(signed < 0, -signed, torch.zeros_like(signed))
    return signed.abs()


def pixel_weights(attributions: torch.Tensor, effect: str = "positive") -> torch.Tensor:
    """float64 ``[B, H*W]`` weights ``w_i = M p_i`` of attribution maps ``[B, C, H, W]``.

    Channels are summed, the chosen effect is kept (:func:`effect_map`) and normalised to shares
    ``p_i``; weights average 1 over the M pixels. A map without attribution of that effect gets
    all-zero weights.
    """
    phi = effect_map(attributions, effect)
    total = phi.sum(dim=1, keepdim=True)
    m = phi.shape[1]
    return torch.where(total > 0, phi * (m / total.clamp_min(1e-300)), torch.zeros_like(phi))


def _quadratic_features(coords: torch.Tensor) -> torch.Tensor:
    """``(1, x, y, x^2, xy, y^2)`` of coordinates ``[..., 2]`` -> ``[..., 6]``."""
    x, y = coords[..., 0], coords[..., 1]
    return torch.stack([torch.ones_like(x), x, y, x * x, x * y, y * y], dim=-1)


def _density_coefficients(
    means: torch.Tensor, covs: torch.Tensor, pis: torch.Tensor, alive: torch.Tensor
) -> torch.Tensor:
    """``[B, J, 6]`` coefficients such that ``coef @ features^T = log pi_j + log N(z | mu_j, S_j)``.

    Closed-form 2 x 2 inverse: ``S = [[a, b], [b, c]]``, ``P = [[c, -b], [-b, a]] / det``;
    ``log N = -log 2pi - log(det)/2 - (z - mu)^T P (z - mu) / 2`` expanded in z.
    """
    a, b, c = covs[..., 0, 0], covs[..., 0, 1], covs[..., 1, 1]
    det = (a * c - b * b).clamp_min(torch.finfo(torch.float64).tiny)
    p00, p01, p11 = c / det, -b / det, a / det
    mx, my = means[..., 0], means[..., 1]
    lin_x = p00 * mx + p01 * my
    lin_y = p01 * mx + p11 * my
    const = -_LOG_2PI - 0.5 * torch.log(det) - 0.5 * (mx * lin_x + my * lin_y)
    # Dead components get -inf through the constant term only; their other coefficients are
    # zeroed so that no inf - inf can occur.
    log_pi = torch.where(alive, torch.log(pis.clamp_min(1e-300)), -torch.inf)
    zero = torch.zeros_like(const)
    coef = torch.stack(
        [
            torch.where(alive, const, zero) + log_pi,
            torch.where(alive, lin_x, zero),
            torch.where(alive, lin_y, zero),
            torch.where(alive, -0.5 * p00, zero),
            torch.where(alive, -p01, zero),
            torch.where(alive, -0.5 * p11, zero),
        ],
        dim=-1,
    )
    return coef


def gmm_log_density(
    coords: torch.Tensor,
    means: torch.Tensor,
    covs: torch.Tensor,
    pis: torch.Tensor,
) -> torch.Tensor:
    """Per-component ``log pi_j + log N(z_i | mu_j, S_j)``: float64 ``[B, N, J]``.

    ``coords`` is ``[N, 2]`` (shared) or ``[B, N, 2]``; components with ``pi_j = 0`` give -inf.
    """
    features = _quadratic_features(coords.to(torch.float64))
    coef = _density_coefficients(means, covs, pis, pis > 0)
    return torch.matmul(features, coef.transpose(-1, -2))


def _uniforms(
    generator: torch.Generator | Sequence[torch.Generator], batch: int, count: int
) -> torch.Tensor:
    """float64 ``[B, count]`` uniforms on CPU: one draw of ``count`` per image from a shared
    generator, or ``count`` from each image's own generator."""
    if isinstance(generator, torch.Generator):
        return torch.rand(batch, count, generator=generator, dtype=torch.float64)
    gens = list(generator)
    if len(gens) != batch:
        raise ValueError(f"got {len(gens)} generators for {batch} images")
    return torch.stack([torch.rand(count, generator=g, dtype=torch.float64) for g in gens])


def _squared_distances(points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``[B, K, N]`` squared distances of points ``[B, N, 2]`` to centres ``[B, K, 2]``
    (written out per coordinate: a reduction over a trailing dim of 2 is slow on CPU)."""
    dx = points[:, None, :, 0] - centres[:, :, None, 0]
    dy = points[:, None, :, 1] - centres[:, :, None, 1]
    return dx * dx + dy * dy


def kmeans_plus_plus_init(
    coords: torch.Tensor,
    weights: torch.Tensor,
    num_clusters: int,
    generator: torch.Generator | Sequence[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy k-means++ seeding on weighted points, batched over images.

    The first centre is drawn with probability proportional to ``w_i``. Each further centre:
    ``2 + floor(ln J)`` candidates are drawn with probability proportional to ``w_i D_i^2``
    (``D_i`` = distance to the nearest centre so far) and the one that most lowers
    ``sum_i w_i D_i^2`` is kept; a single draw too often puts two centres in one heavy region.
    When no weighted point is left at a positive distance (fewer distinct weighted points than
    J), the remaining components are marked dead.

    Returns float64 means ``[B, J, 2]`` and bool ``alive`` ``[B, J]``.
    """
    coords = coords.to(torch.float64)
    weights = weights.to(torch.float64)
    batch, n = weights.shape
    device = weights.device
    pts = coords.expand(batch, n, 2) if coords.dim() == 2 else coords
    trials = 2 + int(math.log(num_clusters)) if num_clusters > 1 else 1
    # Uniforms come from a CPU generator and are moved, so CPU and CUDA draw the same centres.
    u = _uniforms(generator, batch, num_clusters * trials).to(device)
    u = u.view(batch, num_clusters, trials)
    means = torch.zeros(batch, num_clusters, 2, dtype=torch.float64, device=device)
    alive = torch.zeros(batch, num_clusters, dtype=torch.bool, device=device)
    score = weights.clone()
    min_d2 = torch.full_like(weights, torch.inf)
    rows = torch.arange(batch, device=device)
    for j in range(num_clusters):
        cum = torch.cumsum(score, dim=1)
        total = cum[:, -1:]
        ok = total.squeeze(1) > 0
        tries = 1 if j == 0 else trials
        # right=True skips points whose probability is 0 (equal cumulative sums).
        idx = torch.searchsorted(cum, u[:, j, :tries] * total, right=True).clamp_max(n - 1)
        cand = torch.gather(pts, 1, idx.unsqueeze(-1).expand(-1, -1, 2))  # [B, T, 2]
        d2 = _squared_distances(pts, cand)  # [B, T, N]
        new_min = torch.minimum(min_d2.unsqueeze(1), d2)
        potential = (weights.unsqueeze(1) * new_min).sum(-1)  # [B, T]
        best = potential.argmin(dim=1)
        centre = cand[rows, best]
        means[:, j] = torch.where(ok.unsqueeze(1), centre, means[:, j])
        alive[:, j] = ok
        min_d2 = torch.where(ok.unsqueeze(1), new_min[rows, best], min_d2)
        score = weights * min_d2
    return means, alive


def _m_step(
    stats: torch.Tensor, reg_covar: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Parameters from weighted sufficient statistics ``[B, J, 6]`` of normalised weights.

    ``stats[..., k] = sum_i q_i r_ij f_k(z_i)`` with ``f = (1, x, y, x^2, xy, y^2)`` and
    ``sum_i q_i = 1``, so ``stats[..., 0]`` is ``pi_j`` directly.
    """
    mass = stats[..., 0]
    alive = mass > _DEAD_SHARE
    safe = torch.where(alive, mass, torch.ones_like(mass))
    mx, my = stats[..., 1] / safe, stats[..., 2] / safe
    # Second moments minus squared means; in float64 on [0, 1] coordinates the cancellation
    # costs ~1e-15 absolute, far below any useful reg_covar.
    vxx = (stats[..., 3] / safe - mx * mx).clamp_min(0.0)
    vyy = (stats[..., 5] / safe - my * my).clamp_min(0.0)
    vxy = stats[..., 4] / safe - mx * my
    limit = torch.sqrt(vxx * vyy)
    vxy = torch.maximum(torch.minimum(vxy, limit), -limit)
    covs = torch.stack(
        [torch.stack([vxx + reg_covar, vxy], -1), torch.stack([vxy, vyy + reg_covar], -1)], -2
    )
    means = torch.stack([mx, my], -1)
    pis = torch.where(alive, mass, torch.zeros_like(mass))
    pis = pis / pis.sum(-1, keepdim=True).clamp_min(1e-300)
    return means, covs, pis, alive


def _e_step(
    features_t: torch.Tensor, coef: torch.Tensor, q: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Responsibilities times weights ``[B, J, N]`` and the log-likelihood per unit weight.

    Works in the layout ``[B, J, N]``: reductions over the J components then run across
    contiguous rows of N values, several times faster on CPU than over a trailing dim of J.
    """
    logits = torch.bmm(coef, features_t)
    # Max over the few components as a chain of elementwise maxima (faster than amax here).
    peak = logits[:, 0]
    for k in range(1, logits.shape[1]):
        peak = torch.maximum(peak, logits[:, k])
    expd = logits.sub_(peak.unsqueeze(1)).exp_()
    norm = expd.sum(dim=1)
    # Every point, padding included, is a real pixel and every live component has finite
    # coefficients, so log_norm is finite and zero weights contribute exactly 0.
    log_norm = torch.log(norm).add_(peak)
    ll = (q * log_norm).sum(dim=1)
    weighted_resp = expd.mul_((q / norm).unsqueeze(1))
    return weighted_resp, ll


def fit_weighted_gmm(
    coords: torch.Tensor,
    weights: torch.Tensor,
    num_clusters: int,
    generator: torch.Generator | Sequence[torch.Generator],
    max_iter: int = 100,
    tol: float = 1e-5,
    reg_covar: float = 1e-4,
    *,
    init_means: torch.Tensor | None = None,
) -> WeightedGmmFit:
    """Fit a J-component Gaussian mixture to weighted 2-D points by weighted EM, per image.

    Maximises ``sum_i w_i log sum_j pi_j N(z_i | mu_j, S_j)`` with
    ``S_j = weighted covariance + reg_covar * I``.

    - ``coords``: ``[N, 2]`` shared by all images, or ``[B, N, 2]``.
    - ``weights``: ``[B, N]``, non-negative; only points with positive weight influence the fit
      (zero weights contribute nothing to any sum).
    - ``generator``: a CPU generator for k-means++ seeding (J uniforms per image, in batch
      order), or one generator per image (results then do not depend on the batch around an
      image).
    - ``max_iter``: EM iterations at most; ``tol``: an image stops (its parameters freeze) when
      its log-likelihood per unit weight changes by less than ``tol``.
    - ``init_means``: float64 ``[B, J, 2]`` to skip k-means++ (NaN rows mark dead components).

    Components are returned sorted by descending ``pi`` (ties keep the seeding order); dead
    components (``pi = 0``) come last. An image with zero total weight gets ``pi = [1, 0, ...]``,
    means at the centre, ``reg_covar * I`` covariances and log-likelihood 0.
    """
    if weights.dim() != 2:
        raise ValueError(f"weights must be [B, N], got {tuple(weights.shape)}")
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    if reg_covar <= 0:
        raise ValueError(f"reg_covar must be > 0, got {reg_covar}")
    device = weights.device
    weights = weights.to(torch.float64)
    if (weights < 0).any() or not torch.isfinite(weights).all():
        raise ValueError("weights must be finite and non-negative")
    batch, n = weights.shape
    coords = coords.to(device=device, dtype=torch.float64)
    if coords.shape[-2:] != (n, 2) or coords.dim() not in (2, 3):
        raise ValueError(
            f"coords must be [N, 2] or [B, N, 2] with N = {n}, got {tuple(coords.shape)}"
        )
    j = num_clusters
    total = weights.sum(dim=1)
    has_weight = total > 0
    q = weights / total.clamp_min(1e-300).unsqueeze(1)

    # Keep only points that carry weight somewhere in the batch: zero-weight pixels change no
    # sum, and most attribution maps leave a large part of the image non-positive. The stable
    # sort keeps the order of the positive points, so seeding draws the same points as on the
    # full grid.
    keep = (weights > 0).sum(dim=1).max().clamp_min(1)
    order = torch.argsort((weights > 0).to(torch.int8), dim=1, descending=True, stable=True)
    order = order[:, : int(keep)]
    q_kept = torch.gather(q, 1, order)
    pts = coords.expand(batch, n, 2) if coords.dim() == 2 else coords
    pts_kept = torch.gather(pts, 1, order.unsqueeze(-1).expand(-1, -1, 2))

    if init_means is None:
        means0, alive0 = kmeans_plus_plus_init(pts_kept, q_kept, j, generator)
    else:
        init_means = init_means.to(device=device, dtype=torch.float64)
        if tuple(init_means.shape) != (batch, j, 2):
            raise ValueError(f"init_means must be [{batch}, {j}, 2], got {tuple(init_means.shape)}")
        alive0 = torch.isfinite(init_means).all(-1)
        means0 = torch.nan_to_num(init_means, nan=0.0)
    features = _quadratic_features(pts_kept)
    features_t = features.transpose(1, 2).contiguous()

    # Initial hard assignment to the nearest live centre, then one M-step (as k-means seeding
    # is usually followed).
    d2 = _squared_distances(pts_kept, means0).masked_fill(~alive0.unsqueeze(-1), torch.inf)
    hard = torch.nn.functional.one_hot(d2.argmin(1), j).to(torch.float64)  # [B, N, J]
    stats = torch.bmm((hard * q_kept.unsqueeze(-1)).transpose(1, 2), features)
    means, covs, pis, alive = _m_step(stats, reg_covar)
    alive = alive & alive0

    ll = torch.zeros(batch, dtype=torch.float64, device=device)
    prev = torch.full((batch,), -torch.inf, dtype=torch.float64, device=device)
    # ``work``: images whose data is in the working tensors; ``live``: which of them still
    # iterate. A converged image freezes at once (its result does not depend on the batch), but
    # the working tensors are compacted only when a quarter of them has stopped, as copying
    # them costs about as much as an iteration.
    work = has_weight.nonzero().squeeze(1)
    live = torch.ones(work.numel(), dtype=torch.bool, device=device)
    f_w, ft_w, q_w = features[work], features_t[work], q_kept[work]
    for iteration in range(max_iter + 1):
        if work.numel() == 0:
            break
        coef = _density_coefficients(means[work], covs[work], pis[work], alive[work])
        resp, ll_now = _e_step(ft_w, coef, q_w)
        rows = work[live]
        ll_live = ll_now[live]
        ll[rows] = ll_live
        # The log-likelihood reported belongs to the parameters it was computed with, so an
        # image stops before its next M-step.
        done = (ll_live - prev[rows]).abs() < tol
        prev[rows] = ll_live
        if iteration == max_iter:
            break
        live[live.clone()] = ~done
        if not live.any():
            break
        stats = torch.bmm(resp, f_w)
        m_new, c_new, p_new, a_new = _m_step(stats[live], reg_covar)
        step = work[live]
        means[step], covs[step], pis[step] = m_new, c_new, p_new
        alive[step] = a_new & alive[step]
        if int(live.sum()) <= 0.75 * work.numel():
            work = step
            f_w, ft_w, q_w = f_w[live], ft_w[live], q_w[live]
            live = torch.ones(work.numel(), dtype=torch.bool, device=device)

    # Images without weight: one component holding everything.
    eye = torch.eye(2, dtype=torch.float64, device=device) * reg_covar
    empty = ~has_weight
    if empty.any():
        means[empty] = 0.5
        covs[empty] = eye
        pis[empty] = torch.nn.functional.one_hot(
            torch.zeros(int(empty.sum()), dtype=torch.int64, device=device), j
        ).to(torch.float64)
        ll[empty] = 0.0
    # Dead components: unit-free placeholders that no pixel can be assigned to.
    dead = pis <= 0
    means = torch.where(dead.unsqueeze(-1), torch.full_like(means, 0.5), means)
    covs = torch.where(dead[..., None, None], eye.expand_as(covs), covs)

    # Deterministic order: largest share first; a stable sort keeps the seeding order on ties.
    perm = torch.sort(pis, dim=1, descending=True, stable=True).indices
    means = torch.gather(means, 1, perm.unsqueeze(-1).expand(-1, -1, 2))
    covs = torch.gather(covs, 1, perm[..., None, None].expand(-1, -1, 2, 2))
    pis = torch.gather(pis, 1, perm)
    return WeightedGmmFit(means, covs, pis, ll)


def _image_digest(weights: torch.Tensor) -> str:
    return hashlib.sha256(weights.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


class PpepsWgmOptions(PluginOptions):
    num_clusters: int = Field(
        5, ge=1, le=32, description="J, the number of regions per map (method.md 2.2)."
    )
    max_iter: int = Field(100, ge=0, description="Most EM iterations per image.")
    tol: float = Field(
        1e-5,
        ge=0.0,
        description="An image stops when its weighted log-likelihood per unit weight changes "
        "by less than this between iterations.",
    )
    reg_covar: float | None = Field(
        None,
        gt=0.0,
        description="eps added to the diagonal of every covariance, on the [0, 1] coordinate "
        "scale. None: the variance of one pixel cell, 1 / (12 (max(H, W) - 1)^2), which keeps "
        "components from collapsing onto a single pixel.",
    )
    effect: Literal["positive", "negative", "absolute"] = Field(
        "positive",
        description='Which effect of the attribution is segmented: "positive" = max(Phi, 0), '
        'evidence for the class (the paper\'s PPEPS-WGM); "negative" = max(-Phi, 0), evidence '
        'against the class; "absolute" = |Phi|, both. Pixel weights and cluster shares are '
        "shares of the chosen effect. The critic's prompt says which effect the clusters show "
        "(the <effect> text of its template).",
    )


class PpepsWgmSegmenter:
    """Segments the positive (or negative, or absolute) effect of attribution maps into J
    regions with a weighted GMM.

    Cluster 0 is the region with the largest share of the segmented effect, cluster 1 the next,
    and so on. The k-means++ seeding of each image is drawn from a generator seeded by the run
    seed and the image's weights, so an image's segmentation does not depend on the batch it
    comes in. A map without attribution of that effect is ``degenerate``: every pixel in
    cluster 0, shares ``[1, 0, ...]``, log-likelihood 0.
    """

    Options = PpepsWgmOptions

    def __init__(self, options: PpepsWgmOptions) -> None:
        self.options = options

    def segment(self, attributions: torch.Tensor, ctx: RunContext) -> Segmentation:
        """Cluster labels int64 ``[B, H, W]`` and shares for attributions ``[B, C, H, W]``."""
        opts = self.options
        b, _, h, w = attributions.shape
        device = ctx.device
        weights = pixel_weights(attributions, opts.effect).to(device)
        coords = pixel_coordinates(h, w, device=device)
        reg = opts.reg_covar if opts.reg_covar is not None else default_reg_covar(h, w)
        generators = [ctx.generator(f"ppeps-wgm:{_image_digest(row)}") for row in weights]
        fit = fit_weighted_gmm(
            coords,
            weights,
            opts.num_clusters,
            generators,
            max_iter=opts.max_iter,
            tol=opts.tol,
            reg_covar=reg,
        )
        # Every pixel, zero-weight ones too, goes to its most responsible component.
        log_dens = gmm_log_density(coords, fit.means, fit.covs, fit.pis)
        labels = log_dens.argmax(dim=-1).reshape(b, h, w)
        degenerate = weights.sum(dim=1) <= 0
        labels = torch.where(degenerate[:, None, None], torch.zeros_like(labels), labels)
        return Segmentation(
            labels=labels.to(torch.int64).cpu(),
            shares=fit.pis.to(torch.float32).cpu(),
            num_clusters=opts.num_clusters,
            degenerate=degenerate.cpu(),
            log_likelihood=fit.log_likelihood.cpu(),
            effect=opts.effect,
        )
