"""The scripted critic (``plugin = "scripted"``): a built-in critic like the oracle it extends,
the true verdicts with seeded per-cluster mistakes; still importable from lvlmva.testing for
plugin authors' tests."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

import lvlmva.plugins
import lvlmva.testing.critics
from lvlmva.plugins.critics.oracle import OracleCritic
from lvlmva.plugins.critics.scripted import ScriptedCritic
from lvlmva.plugins.judges.rules import RulesJudge
from lvlmva.registry import OWN_DISTRIBUTION, get_registry
from lvlmva.testing.openai_server import synthetic_requests

COLORS = ("red", "blue", "green")
PLUGINS = Path(lvlmva.plugins.__file__).parent


def test_it_is_a_built_in_critic_registered_from_the_plugins_folder():
    entry = get_registry().entry("critic", "scripted")
    assert entry.factory == "lvlmva.plugins.critics.scripted:ScriptedCritic"
    assert entry.distribution == OWN_DISTRIBUTION
    assert get_registry().get("critic", "scripted") is ScriptedCritic
    assert issubclass(ScriptedCritic, OracleCritic)
    # beside the other built-in critics, not among the test helpers
    assert ScriptedCritic.__module__ == "lvlmva.plugins.critics.scripted"
    assert Path(inspect.getfile(ScriptedCritic)) == PLUGINS / "critics" / "scripted.py"


def test_lvlmva_testing_re_exports_it():
    assert lvlmva.testing.critics.ScriptedCritic is ScriptedCritic


def _scripted_request():
    """A 6 x 6 image in three clusters (rows 0-1 red, 2-3 blue, 4-5 green); the true spurious
    mask covers one pixel of green: the truth is red yes, blue yes, green no."""
    (base,) = synthetic_requests(1, COLORS, size=6)
    labels = torch.arange(6).repeat_interleave(6).reshape(6, 6) // 2
    truth = torch.zeros(6, 6, dtype=torch.bool)
    truth[5, 5] = True
    return dataclasses.replace(base, cluster_map=labels, true_mask=truth)


def _verdicts(critic: ScriptedCritic, requests, ctx) -> list[tuple[bool, ...] | None]:
    return [v.relevant for v in RulesJudge(RulesJudge.Options()).judge(critic.critique(requests, ctx), ctx)]


def test_the_scripted_critic_without_errors_gives_the_truth_on_every_draw(ctx):
    request = _scripted_request()
    critic = ScriptedCritic(ScriptedCritic.Options(error_rate=0.0, samples=3))
    requests = [dataclasses.replace(request, draw=d) for d in range(3)]
    out = critic.critique(requests, ctx)
    assert [c.draw for c in out] == [0, 1, 2] and all(c.failure is None for c in out)
    assert _verdicts(critic, requests, ctx) == [(True, True, False)] * 3
    assert "green: covers 12 pixels, 1 on the true spurious feature. Verdict: no" in out[0].text


def test_the_scripted_critic_errs_per_draw_reproducibly(ctx):
    request = _scripted_request()
    critic = ScriptedCritic(ScriptedCritic.Options(error_rate=0.5, spread=0.0, samples=15))
    requests = [dataclasses.replace(request, draw=d) for d in range(15)]
    first = _verdicts(critic, requests, ctx)
    assert first == _verdicts(critic, requests, ctx)  # seeded: the same answers again
    assert len(set(first)) > 1  # coin tosses: the draws differ
    salted = ScriptedCritic(ScriptedCritic.Options(error_rate=0.5, spread=0.0, samples=15, seed=1))
    assert _verdicts(salted, requests, ctx) != first


def test_the_scripted_critic_wants_an_odd_number_of_answers():
    with pytest.raises(ValidationError, match="use an odd number"):
        ScriptedCritic.Options(samples=2)


def _many_requests(n: int = 400):
    """``n`` samples of the three-cluster image (red, blue relevant; green spurious)."""
    request = _scripted_request()
    return [dataclasses.replace(request, sample_id=i) for i in range(n)]


def test_miss_and_false_alarm_rates_err_on_their_own_polarity_only(ctx):
    requests = _many_requests()
    misses_only = _verdicts(ScriptedCritic(ScriptedCritic.Options(miss_rate=0.5, spread=0.0)), requests, ctx)
    assert {v[:2] for v in misses_only} == {(True, True)}  # relevant clusters never called spurious
    missed = sum(v[2] for v in misses_only) / len(requests)  # green called relevant
    assert 0.42 < missed < 0.58
    alarms_only = _verdicts(ScriptedCritic(ScriptedCritic.Options(false_alarm_rate=0.15, spread=0.0)), requests, ctx)
    assert {v[2] for v in alarms_only} == {False}  # the spurious cluster always found
    alarmed = sum((not v[0]) + (not v[1]) for v in alarms_only) / (2 * len(requests))
    assert 0.11 < alarmed < 0.19


@pytest.mark.parametrize("accuracy", [1.0, 0.88, 0.42])
def test_a_target_verdict_accuracy_is_one_minus_the_miss_rate(ctx, accuracy):
    """Verdict accuracy as the seed's Table 1 measures it: the share of spurious clusters marked
    "no"; with spread the clusters' rates differ but keep the mean."""
    requests = _many_requests(1000)
    critic = ScriptedCritic(ScriptedCritic.Options(miss_rate=round(1.0 - accuracy, 2), false_alarm_rate=0.05, spread=0.5))
    verdicts = _verdicts(critic, requests, ctx)
    found = sum(not v[2] for v in verdicts) / len(verdicts)
    assert abs(found - accuracy) < 0.04


def test_the_two_ways_of_setting_rates_are_not_mixed():
    with pytest.raises(ValidationError, match="either error_rate"):
        ScriptedCritic.Options(error_rate=0.1, miss_rate=0.2)
    assert ScriptedCritic(ScriptedCritic.Options()).mean_rate(True) == 0.15  # the default error rate
    assert ScriptedCritic(ScriptedCritic.Options(miss_rate=0.3)).mean_rate(False) == 0.0
