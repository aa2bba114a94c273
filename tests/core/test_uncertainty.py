"""Several critic answers per sample: the majority and uncertainty of ``combine_draws`` and the
OpenAI critic's ``samples`` (one request and one cache entry per answer, odd counts above a zero
temperature only). The scripted critic's draws are tested in tests/plugins/test_scripted_critic.py."""

from __future__ import annotations

import dataclasses
import json

import pytest
from pydantic import ValidationError

from lvlmva.plugins.lvlm.cache import ResponseCache
from lvlmva.plugins.lvlm.openai_backend import OpenAICritic, estimate_spending
from lvlmva.records import Usage, Verdicts
from lvlmva.testing.openai_server import ScriptedOpenAIServer, synthetic_requests
from lvlmva.verdicts import combine_draws, uncertainty_of

COLORS = ("red", "blue", "green")


def _draw(relevant, sample: int = 5, **kw) -> Verdicts:
    if relevant is None:
        kw.setdefault("failure", "no verdict")
    return Verdicts(sample, COLORS, relevant, **kw)


# -- combine_draws ------------------------------------------------------------------------------


def test_majority_per_colour_and_the_share_of_disagreeing_votes():
    draws = [
        _draw((True, False, True), usage=Usage(prompt_tokens=10, requests=1), ignored_colors=("pink",)),
        _draw((True, True, True), usage=Usage(prompt_tokens=20, requests=1), attempts=2),
        _draw((False, False, True), usage=Usage(prompt_tokens=30, requests=1), ignored_colors=("pink", "teal")),
    ]
    v = combine_draws(draws)
    assert v.ok and v.relevant == (True, False, True)
    # red: 1 of 3 against, blue: 1 of 3 against, green: none; 2 of the 9 votes cast
    assert v.uncertainty == pytest.approx(2 / 9)
    assert v.votes == ((True, False, True), (True, True, True), (False, False, True))
    assert v.usage.prompt_tokens == 60 and v.usage.requests == 3 and v.attempts == 4
    assert v.ignored_colors == ("pink", "teal")
    assert Verdicts.from_state(v.to_state()) == v  # votes and uncertainty are stored


def test_unanimous_answers_have_no_uncertainty():
    v = combine_draws([_draw((True, False, True))] * 5)
    assert v.relevant == (True, False, True) and v.uncertainty == 0.0 and len(v.votes) == 5


def test_a_tie_is_a_failure_naming_the_colour():
    # one answer gave no verdicts: two votes remain, split on red only
    v = combine_draws([_draw((True, False, True)), _draw(None, failure="empty answer"), _draw((False, False, True))])
    assert not v.ok and v.relevant is None and not v.retryable
    assert v.failure == "the 2 answers with verdicts are tied on red (1 yes, 1 no)"
    assert v.votes == ((True, False, True), None, (False, False, True))
    assert v.uncertainty == pytest.approx(1 / 6)


def test_no_draw_with_verdicts_fails_with_the_first_reason_and_any_retryable():
    draws = [_draw(None, failure="cut off"), _draw(None, failure="connection refused", retryable=True), _draw(None, failure="x")]
    v = combine_draws(draws)
    assert v.relevant is None and v.retryable
    assert v.failure == "no answer of 3 gave verdicts; the first: cut off"
    assert not combine_draws([_draw(None, failure="a"), _draw(None, failure="b"), _draw(None, failure="c")]).retryable


def test_one_draw_is_returned_as_it_is():
    only = _draw((True, False, False), uncertainty=0.0)
    assert combine_draws([only]) is only
    assert combine_draws([only]).votes == ()


def test_draws_of_different_samples_are_refused():
    with pytest.raises(ValueError, match="different samples"):
        combine_draws([_draw((True,) * 3, sample=1), _draw((True,) * 3, sample=2)])
    with pytest.raises(ValueError):
        combine_draws([])


def test_uncertainty_of_matches_a_direct_count(rng):
    votes = rng.random((7, 4)) < 0.5
    majority = votes.sum(axis=0) > 3
    assert uncertainty_of(votes.tolist(), majority.tolist()) == pytest.approx(float((votes != majority).mean()))


# -- the OpenAI critic ---------------------------------------------------------------------------

FAST = dict(api_key_env="", timeout_s=5.0, backoff_initial_s=0.01, backoff_max_s=0.05, temperature=0.7)


def test_the_openai_critic_asks_each_draw_and_caches_it_under_its_own_key(ctx):
    samples = synthetic_requests(2, COLORS)
    requests = [dataclasses.replace(r, draw=d) for r in samples for d in range(3)]
    with ScriptedOpenAIServer() as server:
        critic = OpenAICritic(OpenAICritic.Options(base_url=server.base_url, samples=3, **FAST))
        out = critic.critique(requests, ctx)
        assert server.count == 6  # 3 per sample
        assert [(c.sample_id, c.draw) for c in out] == [(r.sample_id, r.draw) for r in requests]
        assert all(c.failure is None for c in out)
        # each answer of a sample is asked with its own seed (the first with the run's)
        seeds = {}
        for r in server.requests:
            prompt = json.dumps(r.body["messages"])
            seeds.setdefault(prompt, []).append(r.body["seed"])
        assert len(seeds) == 2
        assert all(len(set(s)) == 3 and ctx.seed in s for s in seeds.values())
        with ResponseCache(ctx.cache_dir / "responses.sqlite") as cache:
            assert len(cache) == 6  # one entry per answer

        again = critic.critique(requests, ctx)
        assert server.count == 6  # a re-run asks nothing
        assert [c.text for c in again] == [c.text for c in out]
        assert all(c.usage.cache_hits == 1 for c in again)

        # the first answer keeps the key an unsampled critic uses
        single = OpenAICritic(OpenAICritic.Options(base_url=server.base_url, **FAST))
        single.critique(samples, ctx)
        assert server.count == 6


def test_without_a_seed_the_draw_index_alone_keeps_the_answers_apart(ctx):
    # the bodies of a sample's answers are then identical: only the key's draw index differs
    samples = synthetic_requests(2, COLORS)
    requests = [dataclasses.replace(r, draw=d) for r in samples for d in range(3)]
    with ScriptedOpenAIServer() as server:
        critic = OpenAICritic(OpenAICritic.Options(base_url=server.base_url, samples=3, send_seed=False, **FAST))
        critic.critique(requests, ctx)
        assert server.count == 6 and all("seed" not in r.body for r in server.requests)
        with ResponseCache(ctx.cache_dir / "responses.sqlite") as cache:
            assert len(cache) == 6
        critic.critique(requests, ctx)
        assert server.count == 6


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(samples=3, temperature=0.0), "samples = 3 needs temperature > 0"),
        (dict(samples=2, temperature=0.7), "samples = 2: use an odd number"),
        (dict(samples=16, temperature=0.7), "less than or equal to 15"),
    ],
)
def test_samples_the_openai_critic_cannot_honour_are_refused(options, message):
    with pytest.raises(ValidationError, match=message):
        OpenAICritic.Options(api_key_env="", **options)


def test_the_spending_estimate_counts_every_answer():
    options = OpenAICritic.Options(api_key_env="", samples=5, temperature=1.0)
    estimate = estimate_spending("critic", options, 4)
    assert estimate.requests == 20
    assert "5 answers each (critic.samples)" in estimate.basis
