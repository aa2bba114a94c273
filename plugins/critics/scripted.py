"""A scripted critic for offline runs: the true answer per cluster, wrong at a chosen rate.

It reads the data set's true spurious masks (like the oracle critic) and writes the oracle's
lines (``red: covers 40 pixels, ... Verdict: no``), but each cluster has its own error rate, and
each answer gets that cluster's verdict wrong with that probability. It is not a model of an
LVLM and none of its numbers say how an LVLM does: it exists so that what depends on a
critic's mistakes (several answers per sample and their uncertainty, the review of verdicts)
can be run and measured without one.

- ``error_rate``: the mean probability that one answer gets one cluster wrong, whatever its
  true verdict.
- ``miss_rate`` and ``false_alarm_rate`` instead: separate mean probabilities of calling a
  spurious cluster relevant (a miss) and a relevant cluster spurious (a false alarm). Verdict
  accuracy as the seed's Table 1 measures it (the share of clusters on a spurious feature that
  are marked "no") is then ``1 - miss_rate`` in expectation, so a critic can be set to a target
  verdict accuracy and, independently, to how often it masks what it should keep.
- ``spread``: 0 gives every cluster its mean rate; towards 1 the rates of clusters differ more
  (drawn from a Beta distribution with that mean): a few clusters become near coin tosses and
  most are nearly always right, as for a critic that finds some regions hard.
- ``samples``: answers per alignment sample (``critic.samples``); each answer draws its errors
  anew, the clusters' rates stay.

Everything is seeded by the run seed, ``seed``, the sample, the colour and the answer's index.
"""

from __future__ import annotations

import hashlib
from typing import ClassVar

import numpy as np
from pydantic import Field, model_validator

from lvlmva.plugins.critics.oracle import OracleCritic
from lvlmva.protocols import PluginOptions, RunContext
from lvlmva.records import CritiqueRequest

__all__ = ["ScriptedCritic"]


#: the error rate when no rate is given
DEFAULT_ERROR_RATE = 0.15


def _rng(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


class ScriptedCritic(OracleCritic):
    """Simulated critic (not an LVLM): the true verdicts, each wrong with a per-cluster error rate.

    The oracle critic's checks and overlaps, with each cluster's verdict flipped at its rate."""

    class Options(PluginOptions):
        """Settings of the scripted critic."""

        error_rate: float | None = Field(
            None,
            ge=0.0,
            le=0.5,
            description="Mean probability that one answer gets one cluster's verdict wrong, whatever its true verdict "
            "(0.15 when none of error_rate, miss_rate and false_alarm_rate is given; give miss_rate and "
            "false_alarm_rate instead to set the two kinds of error apart).",
        )
        miss_rate: float | None = Field(
            None,
            ge=0.0,
            le=1.0,
            description="Mean probability that one answer calls a spurious cluster relevant ('yes'): 1 - the verdict "
            "accuracy of the seed's Table 1. With false_alarm_rate (0 when not given), instead of error_rate.",
        )
        false_alarm_rate: float | None = Field(
            None,
            ge=0.0,
            le=1.0,
            description="Mean probability that one answer calls a relevant cluster spurious ('no'). With miss_rate "
            "(0 when not given), instead of error_rate.",
        )
        spread: float = Field(
            0.5,
            ge=0.0,
            lt=1.0,
            description="How much the error rates of clusters differ: 0 = all have error_rate; towards 1 a few "
            "clusters are near coin tosses and most nearly always right (rates from a Beta distribution with mean "
            "error_rate and concentration (1 - spread) / spread).",
        )
        min_overlap: float = Field(
            1e-6,
            gt=0.0,
            le=1.0,
            description="Share of a cluster's pixels on the true spurious mask that makes its true verdict 'no' "
            "(the default: any pixel, the truth verdict accuracy is scored against).",
        )
        samples: int = Field(1, ge=1, le=15, description="Answers per alignment sample (an odd number above 1: the judge's majority decides).")
        seed: int = Field(0, description="Salt for the error draws (with the run seed).")

        @model_validator(mode="after")
        def _one_way_to_set_rates(self) -> ScriptedCritic.Options:
            polar = self.miss_rate is not None or self.false_alarm_rate is not None
            if polar and self.error_rate is not None:
                raise ValueError(
                    "give either error_rate (one rate for every cluster) or miss_rate and false_alarm_rate "
                    "(a rate per true verdict), not both"
                )
            return self

        @model_validator(mode="after")
        def _odd(self) -> ScriptedCritic.Options:
            if self.samples > 1 and self.samples % 2 == 0:
                raise ValueError(f"samples = {self.samples}: use an odd number, so that every colour has a majority")
            return self

    model_name: ClassVar[str] = "scripted"
    #: what tables say about its verdicts
    truth_note: ClassVar[str] = "reads the true masks and errs at a scripted rate: a simulation, not an LVLM"

    def mean_rate(self, spurious: bool) -> float:
        """The mean error rate of a cluster whose true verdict is ``spurious`` ("no") or not."""
        opts = self.options
        if opts.miss_rate is None and opts.false_alarm_rate is None:
            return DEFAULT_ERROR_RATE if opts.error_rate is None else opts.error_rate
        return (opts.miss_rate or 0.0) if spurious else (opts.false_alarm_rate or 0.0)

    def rate(self, run_seed: int, sample_id: int, color: str, spurious: bool = False) -> float:
        """The error rate of one cluster (the same for every answer); ``spurious``: its true
        verdict is "no" (it matters only with ``miss_rate`` / ``false_alarm_rate``)."""
        mean, spread = self.mean_rate(spurious), self.options.spread
        if mean in (0.0, 1.0) or spread == 0.0:
            return mean
        concentration = (1.0 - spread) / spread
        return float(_rng(run_seed, self.options.seed, "rate", sample_id, color).beta(mean * concentration, (1.0 - mean) * concentration))

    def _line(self, request: CritiqueRequest, ctx: RunContext, color: str, n: int, k: int) -> str:
        spurious = n > 0 and k > 0 and k / n >= self.options.min_overlap
        flip = _rng(ctx.seed, self.options.seed, "answer", request.sample_id, color, request.draw).random() < self.rate(ctx.seed, request.sample_id, color, spurious)
        verdict = "yes" if spurious == flip else "no"
        return f"{color}: covers {n} pixels, {k} on the true spurious feature. Verdict: {verdict}"
