"""The LVLM flows written once (plugins/lvlm/flow.py) behind the transport seam: a transport that
answers a whole list at once, late and out of order (as a batch API does); cache keys the same as
before the flows were shared (answers cached then are read with no request); answers cached by an
older check that no longer pass; identical requests asked once; the plan a run prints."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import Field

from lvlmva.plugins.lvlm.cache import ResponseCache, sha256_hex
from lvlmva.plugins.lvlm.flow import (
    LvlmCritic,
    LvlmJudge,
    max_invalid_attempts_field,
    retry_invalid_field,
)
from lvlmva.plugins.lvlm.openai_backend import OpenAICritic, OpenAIJudge
from lvlmva.plugins.lvlm.transformers_backend import TransformersCritic, TransformersJudge
from lvlmva.plugins.lvlm.transport import ChatAnswer, ChatRequest, TransportFailure
from lvlmva.protocols import PluginOptions, RunContext
from lvlmva.records import Critique
from lvlmva.testing.openai_server import ScriptedOpenAIServer, critic_answer, synthetic_requests

COLORS = ("red", "blue", "green")
WHOLE = "Red: on the digit. Verdict: yes\nBlue: the corner square. Verdict: no\nGreen: a stroke. Verdict: yes"
VALID = json.dumps({"output": [{"color": c, "verdict": "no" if c == "blue" else "yes"} for c in COLORS]})


def _ctx(root: Path, seed: int = 0) -> RunContext:
    root.mkdir(parents=True, exist_ok=True)
    return RunContext(seed=seed, device=torch.device("cpu"), run_dir=root, stage_dir=root, cache_dir=root / "cache")


def _transcripts(ctx: RunContext) -> list[dict]:
    path = ctx.run_dir / "transcripts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# -- a transport that answers a whole list at once -----------------------------------------------


class BatchTransport:
    """Takes every request of a round as one job, answers after a wait, in reverse order, as a
    batch API would; ``answer(request)`` gives each outcome."""

    kind = "test-batch"

    def __init__(self, role: str, answer: Any) -> None:
        self.role, self.model, self._answer = role, "batch-model", answer
        self.batches: list[list[ChatRequest]] = []
        self.deliver_twice = self.deliver_none = False

    def key_parts(self, request: ChatRequest) -> dict[str, Any]:
        return {"backend": self.kind, "role": self.role, "model": self.model, "prompt": [request.system, request.user],
                "images": [sha256_hex(png) for png in request.images], "params": {"seed": request.seed}}  # fmt: skip

    async def answer(self, requests, deliver) -> None:
        self.batches.append(list(requests))
        await asyncio.sleep(0.01)  # the batch is done later, all at once
        if self.deliver_none:
            return
        for i in reversed(range(len(requests))):
            deliver(i, self._answer(requests[i]))
            if self.deliver_twice:
                deliver(i, self._answer(requests[i]))


class BatchOptions(PluginOptions):
    """Options of the batch-transport plugins below."""

    model: str = Field("batch-model", description="Model.")
    family: str | None = Field(None, description="Template family.")
    template: str | None = Field(None, description="Template file.")
    cache: bool = Field(True, description="Use the response cache.")
    cache_dir: Path | None = Field(None, description="Cache folder.")
    repair_attempts: int = Field(1, description="Repair rounds.")
    max_invalid_attempts: int = max_invalid_attempts_field()
    retry_invalid: bool = retry_invalid_field()


class BatchCritic(LvlmCritic):
    backend = "test-batch"

    def __init__(self, options: BatchOptions, transport: BatchTransport) -> None:
        super().__init__(options)
        self.batch = transport

    def transport(self, ctx: RunContext) -> BatchTransport:
        return self.batch

    @property
    def token_limit(self) -> tuple[str, int]:
        return ("max_tokens", 99)


class BatchJudge(LvlmJudge):
    backend = "test-batch"
    transport = BatchCritic.transport
    token_limit = BatchCritic.token_limit

    def __init__(self, options: BatchOptions, transport: BatchTransport) -> None:
        super().__init__(options)
        self.batch = transport


def _critique(sample_id: int, text: str | None = None) -> Critique:
    text = text if text is not None else f"{WHOLE} (sample {sample_id})"
    return Critique(sample_id, COLORS, text, family="decoy-mnist", label="7", model="m")


def test_a_transport_that_answers_each_round_as_one_batch_gets_the_repairs_as_a_second(tmp_path):
    ctx = _ctx(tmp_path)

    def answer(request: ChatRequest):
        if "sample 1)" in request.user:
            return TransportFailure("batch expired at the batch service", retryable=True, attempts=1)
        if "sample 2)" in request.user:
            return TransportFailure("request refused: content policy", retryable=False, attempts=1)
        if "sample 3)" in request.user and not request.turns:
            return ChatAnswer("I think blue is a decoy.", prompt_tokens=10, completion_tokens=5, cost_usd=0.5)
        return ChatAnswer(VALID, prompt_tokens=10, completion_tokens=5, cost_usd=0.5)

    transport = BatchTransport("judge", answer)
    judge = BatchJudge(BatchOptions(), transport)
    critiques = [_critique(i) for i in range(4)]
    plan = judge.plan(critiques, ctx)
    assert plan.requests == 4 and str(plan) == (
        "judge (test-batch batch-model): sends 4 requests (4 missing) and up to 4 more to repair "
        "invalid answers (judge.repair_attempts = 1)"
    )
    verdicts = judge.judge(critiques, ctx)
    # one batch of the four first requests, one of the repair of sample 3's answer
    assert [len(b) for b in transport.batches] == [4, 1]
    assert transport.batches[1][0].turns == (
        ("assistant", "I think blue is a decoy."),
        ("user", transport.batches[1][0].turns[1][1]),
    ) and transport.batches[1][0].turns[1][1].startswith("Your answer could not be used: the answer contains no JSON")
    assert [v.sample_id for v in verdicts] == [0, 1, 2, 3]  # in order, though answered in reverse
    assert verdicts[0].relevant == (True, False, True) and verdicts[0].usage.cost_usd == 0.5
    assert verdicts[1].failure == "batch expired at the batch service" and verdicts[1].retryable
    assert verdicts[2].failure == "request refused: content policy" and not verdicts[2].retryable
    assert verdicts[3].relevant == (True, False, True) and verdicts[3].attempts == 2
    assert verdicts[3].usage.cost_usd == 1.0 and verdicts[3].usage.requests == 2
    with ResponseCache(ctx.cache_dir / "responses.sqlite") as cache:
        assert len(cache) == 2  # the good answers; no failure is stored as one
        keys = [judge._jobs([c], ctx, transport, cache)[0].key for c in critiques]
        assert cache.unanswered(keys[1]) and not cache.unanswered(keys[2])
    # the next call asks only what failed: the expired request again, the refused one too (it
    # says asking again cannot help, but nothing marks it answered)
    again = judge.plan(critiques, ctx)
    assert again.reasons == {"failed in transport": 1, "missing": 1} and again.cached == 2


@pytest.mark.parametrize("fault", ["deliver_twice", "deliver_none"])
def test_a_transport_must_deliver_each_request_exactly_once(tmp_path, fault):
    transport = BatchTransport("judge", lambda request: ChatAnswer(VALID))
    setattr(transport, fault, True)
    with pytest.raises(RuntimeError, match="test-batch"):
        BatchJudge(BatchOptions(), transport).judge([_critique(0), _critique(1)], _ctx(tmp_path))


def test_identical_requests_are_asked_once_and_share_the_answer(tmp_path):
    ctx = _ctx(tmp_path)
    transport = BatchTransport("judge", lambda request: ChatAnswer(VALID, prompt_tokens=7, cost_usd=0.25))
    judge = BatchJudge(BatchOptions(), transport)
    same = [_critique(i, text=WHOLE) for i in range(3)]  # three critiques that read alike
    plan = judge.plan(same, ctx)
    assert plan.requests == 1 and plan.shared == 2 and "2 the same as another request (asked once)" in str(plan)
    verdicts = judge.judge(same, ctx)
    assert [len(b) for b in transport.batches] == [1]
    assert all(v.relevant == (True, False, True) for v in verdicts)
    assert sum(v.usage.cost_usd for v in verdicts) == 0.25  # paid once
    assert [v.usage.cache_hits for v in verdicts] == [0, 1, 1]
    assert [line.get("same_as") for line in _transcripts(ctx)] == [None, 0, 0]


def test_an_unusable_answer_is_shared_and_counted_once(tmp_path):
    ctx = _ctx(tmp_path)
    transport = BatchTransport("judge", lambda request: ChatAnswer("no JSON at all"))
    judge = BatchJudge(BatchOptions(max_invalid_attempts=2), transport)
    same = [_critique(i, text=WHOLE) for i in range(2)]
    first = judge.judge(same, ctx)
    assert [len(b) for b in transport.batches] == [1, 1]  # the request and its repair, once
    assert all(v.retryable and "unusable answer 1 of judge.max_invalid_attempts = 2" in v.failure for v in first)
    second = judge.judge(same, ctx)
    assert len(transport.batches) == 4 and not any(v.retryable for v in second)
    assert judge.plan(same, ctx).given_up == 2 and judge.plan(same, ctx).requests == 0


def test_without_the_cache_an_unusable_answer_is_a_recorded_failure_at_once(tmp_path):
    transport = BatchTransport("critic", lambda request: ChatAnswer("Sure! Here is my analysis..."))
    critic = BatchCritic(BatchOptions(cache=False), transport)
    [out] = critic.critique(synthetic_requests(1, COLORS), _ctx(tmp_path))
    assert out.failure == "critic answer discusses none of the cluster colours (red, blue, green)"
    assert not out.retryable  # nothing could count a second unusable answer
    assert str(critic.plan(synthetic_requests(1, COLORS), _ctx(tmp_path))).endswith("(1 cache off)")


# -- answers cached before the flows were shared ----------------------------------------------------

#: keys written by the backends before the flows were shared (PYTHONPATH on a copy of that
#: revision), for synthetic_requests(1, COLORS), a run seed of 3 and _OLD_CRITIQUE
OLD_KEYS = {
    "openai critic": ["d1f27482fa6c4e70b41a69184cd8fea28b90ab4c2fd473badd98846823562819"],
    "openai critic draws": [
        "1571ba173b74f759e1ec50c007532198bc28d9e5e17991969cb3378074fb6b94",
        "1fa8243c36808408f07e9b1d68f13d9a2f5cf87e108bc9938af433806bc3336a",
        "57ca634ad19158549806f4859a35a0917cc8a97b41aa8049b6002226c78a2917",
    ],
    "openai judge json_schema": ["a484e69eba258f0988a5bd7aeb91a163cb5dbaffe12a28f4176df3d6a4a44c12"],
    "openai judge json_object": ["ffdc2708e4c131e55c86655105e671f1303eba1cc0f89e89a95ff744e51f19ba"],
    "openai judge none": ["9b66790d7cc6f865cde42eef0ec42629541061a03d6adeede8917bf73cf006ca"],
    "transformers critic": ["0579df64c3e3257a875b5bf16328db8309bff47cba10d2e1866ee825d2800a5e"],
    "transformers judge system_role=True": ["20d6e60352e6846441b9a12efa34ccf6c6f04dc6d84ce6daded69d2cc202c5d0"],
    "transformers judge system_role=False": ["baf61d0b11452eed458a75944b2d7f5648a3e2cb04fa6e858f27bc558e45d6e5"],
}
_OLD_CRITIQUE = Critique(4, COLORS, "Red: yes. Blue: decoy. Green: yes.", family="decoy-mnist", label="7", model="m")
FAST = dict(api_key_env="", timeout_s=5.0, backoff_initial_s=0.0)


def _plugins(url: str) -> dict[str, tuple[Any, list[Any]]]:
    [request] = synthetic_requests(1, COLORS)
    draws = [dataclasses.replace(request, draw=d) for d in range(3)]
    out: dict[str, tuple[Any, list[Any]]] = {
        "openai critic": (OpenAICritic(OpenAICritic.Options(base_url=url, **FAST)), [request]),
        "openai critic draws": (OpenAICritic(OpenAICritic.Options(base_url=url, samples=3, temperature=0.7, **FAST)), draws),
        "transformers critic": (TransformersCritic(TransformersCritic.Options(model="/models/x")), [request]),
    }
    for fmt in ("json_schema", "json_object", "none"):
        out[f"openai judge {fmt}"] = (OpenAIJudge(OpenAIJudge.Options(base_url=url, response_format=fmt, **FAST)), [_OLD_CRITIQUE])
    for system_role in (True, False):
        judge = TransformersJudge(TransformersJudge.Options(model="/models/y", system_role=system_role))
        out[f"transformers judge system_role={system_role}"] = (judge, [_OLD_CRITIQUE])
    return out


@pytest.mark.parametrize("name", list(OLD_KEYS))
def test_answers_cached_under_the_keys_of_before_are_read_without_a_request(tmp_path, name):
    ctx = _ctx(tmp_path, seed=3)
    answer = VALID if "judge" in name else WHOLE
    with ResponseCache(ctx.cache_dir / "responses.sqlite") as cache:
        for key in OLD_KEYS[name]:
            cache.put(key, answer, {"model": "written before"})
    with ScriptedOpenAIServer(answer="never used") as server:
        plugin, items = _plugins(server.base_url)[name]
        assert plugin.plan(items, ctx).cached == len(items)
        out = plugin.judge(items, ctx) if "judge" in name else plugin.critique(items, ctx)
        assert server.count == 0  # and the transformers models, which do not exist, were not loaded
    assert all(o.failure is None and o.usage.cache_hits == 1 for o in out)


def test_a_cut_off_critic_answer_cached_as_good_before_is_moved_to_the_unusable_and_asked_again(tmp_path):
    """Before the checks were shared, a critic answer cut short by a server that still said
    "stop" was cached as a good answer; now it is an unusable one, and the request is asked again."""
    ctx = _ctx(tmp_path)
    requests = synthetic_requests(1)
    with ScriptedOpenAIServer() as server:
        critic = OpenAICritic(OpenAICritic.Options(base_url=server.base_url, **FAST))
        [job] = critic._jobs(requests, ctx, critic.transport(ctx), None)
        key = ResponseCache.key(**critic.transport(ctx).key_parts(job.chat), template_version=job.record["template_version"])
        cut = critic_answer({"messages": [{"role": "user", "content": [{"type": "text", "text": job.chat.user}]}]})[:120]
        with ResponseCache(ctx.cache_dir / "responses.sqlite") as cache:
            cache.put(key, cut)
        plan = critic.plan(requests, ctx)
        assert plan.reasons == {"invalid so far": 1} and plan.cached == 0
        [out] = critic.critique(requests, ctx)
        assert server.count == 1 and out.text is not None and out.text != cut
    with ResponseCache(ctx.cache_dir / "responses.sqlite") as cache:
        assert cache.get(key) == out.text and cache.unusable(key)[0][0] == cut


def test_a_stored_unusable_answer_that_passes_a_later_check_is_used(tmp_path):
    ctx = _ctx(tmp_path)
    transport = BatchTransport("judge", lambda request: ChatAnswer("never used"))
    judge = BatchJudge(BatchOptions(), transport)
    critique = _critique(0)
    [job] = judge._jobs([critique], ctx, transport, None)
    with ResponseCache(ctx.cache_dir / "responses.sqlite") as cache:
        cache.add_unusable(job.key, VALID, {"finish_reason": "stop"})  # stored by a stricter check
    [v] = judge.judge([critique], ctx)
    assert v.relevant == (True, False, True) and v.usage.cache_hits == 1 and transport.batches == []
    with sqlite3.connect(ctx.cache_dir / "responses.sqlite") as db:
        assert db.execute("SELECT answer FROM responses").fetchall() == [(VALID,)]


def test_the_requests_draw_one_bar_through_the_run_context_and_repairs_grow_it(tmp_path, monkeypatch):
    from contextlib import contextmanager

    import lvlmva.progress as progress_module
    from lvlmva.progress import ProgressBar

    bars = []

    @contextmanager
    def record(enabled, description, total, *, completed=0, transient=False, console=None):
        bar = ProgressBar(total, completed)
        yield bar
        bars.append((enabled, description, transient, bar))

    monkeypatch.setattr(progress_module, "progress_bar", record)
    ctx = dataclasses.replace(_ctx(tmp_path), progress=True)

    def answer(request: ChatRequest):
        if "sample 1)" in request.user and not request.turns:  # repaired in a second round
            return ChatAnswer("no JSON here", prompt_tokens=1, completion_tokens=1)
        return ChatAnswer(VALID, prompt_tokens=1, completion_tokens=1)

    BatchJudge(BatchOptions(), BatchTransport("judge", answer)).judge([_critique(i) for i in range(3)], ctx)
    [(enabled, description, transient, bar)] = bars
    assert enabled and transient and description == "judge (batch-model)"
    assert bar.total == 4 and bar.completed == 4  # three requests and one repair
