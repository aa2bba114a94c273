"""A critic that reads the data set's true spurious masks instead of looking at images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pydantic import Field

from lvlmva.masks import cluster_overlap
from lvlmva.protocols import PluginOptions, RunContext
from lvlmva.records import Critique, CritiqueRequest

__all__ = ["OracleCritic"]


class OracleCritic:
    """Upper-bound critic: calls a cluster spurious from the true mask (needs true masks; no LVLM).

    For every cluster it counts the pixels and how many of them lie in the sample's true spurious
    mask, and writes one line per colour ending in a verdict::

        red: covers 40 pixels, 16 of them (40%) on the true spurious feature. Verdict: no
        blue: covers 210 pixels, none on the true spurious feature. Verdict: yes

    A cluster is spurious ("no") when at least ``min_overlap`` of its pixels lie in the true mask.
    This is not a model of an LVLM: it knows the answer per pixel, which a real critic never
    does, so runs with it bound from above what the LVLM critics can reach. It only works on data
    sets that ship true masks (DecoyMNIST); a request without one gets a failed ``Critique``.
    """

    class Options(PluginOptions):
        """Settings of the oracle critic."""

        min_overlap: float = Field(
            0.25,
            gt=0.0,
            le=1.0,
            description=(
                "Share of a cluster's pixels that must lie in the true spurious mask for the "
                "cluster to be called spurious. PPEPS-WGM clusters tile the whole image: on "
                "DecoyMNIST (J = 5) the cluster fitted to the 16-pixel square holds some "
                "background around it and is 35-60 % decoy, while a large cluster that swallowed "
                "the square together with the digit is 3-20 % decoy. 0.25 calls the first "
                "spurious and keeps the second, whose mask would also forbid the digit. A tiny "
                "value (e.g. 1e-6) gives 'spurious if it overlaps at all', the truth that "
                "verdict accuracy is scored against."
            ),
        )

    needs_true_masks: ClassVar[bool] = True

    def __init__(self, options: OracleCritic.Options | None = None) -> None:
        self.options = options if options is not None else self.Options()

    #: what Critique.model and failures call this critic
    model_name: ClassVar[str] = "oracle"

    def critique(self, requests: Sequence[CritiqueRequest], ctx: RunContext) -> list[Critique]:
        """One line per cluster colour with its overlap and a verdict, per request."""
        return [self._one(request, ctx) for request in requests]

    def _fail(self, request: CritiqueRequest, reason: str) -> Critique:
        return Critique(
            sample_id=request.sample_id,
            colors=tuple(request.colors),
            text=None,
            failure=f"{self.model_name} critic, sample {request.sample_id}: {reason}",
            model=self.model_name,
            family=request.family,
            label=request.label,
            draw=request.draw,
        )

    def _one(self, request: CritiqueRequest, ctx: RunContext) -> Critique:
        colors = tuple(request.colors)
        if request.true_mask is None:
            return self._fail(request, "no true spurious mask (the data set provides none)")
        cmap, tmask = request.cluster_map, request.true_mask
        if cmap.dim() != 2 or tuple(tmask.shape) != tuple(cmap.shape):
            return self._fail(
                request,
                f"true mask {tuple(tmask.shape)} and cluster map {tuple(cmap.shape)} "
                "must both be [H,W] of the same size",
            )
        if cmap.numel() and (int(cmap.min()) < 0 or int(cmap.max()) >= len(colors)):
            return self._fail(
                request,
                f"cluster map holds labels {int(cmap.min())}..{int(cmap.max())} "
                f"but only {len(colors)} colours are named",
            )
        pixels, on_mask = cluster_overlap(
            cmap[None].long(), tmask[None].bool(), num_clusters=len(colors)
        )
        rows = zip(colors, pixels[0].tolist(), on_mask[0].tolist(), strict=True)
        return Critique(
            sample_id=request.sample_id,
            colors=colors,
            text="\n".join(self._line(request, ctx, color, n, k) for color, n, k in rows),
            model=self.model_name,
            family=request.family,
            label=request.label,
            draw=request.draw,
        )

    def _line(self, request: CritiqueRequest, ctx: RunContext, color: str, n: int, k: int) -> str:
        """One cluster's line: ``n`` pixels, ``k`` of them on the true mask."""
        if n == 0:
            return f"{color}: covers no pixels. Verdict: yes"
        share = k / n
        spurious = k > 0 and share >= self.options.min_overlap
        on = "none" if k == 0 else f"{k} of them ({share:.0%})"
        verdict = "no" if spurious else "yes"
        return f"{color}: covers {n} pixels, {on} on the true spurious feature. Verdict: {verdict}"
