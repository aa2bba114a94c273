"""The OpenAI critic and judge through OpenAI's Batch API (``api = "batch"``), against the local
scripted server: the same answers and cache keys as chat completions, one batch per round, a
run stopped while its batch is pending finishing on the same batch, expired and partly failed
batches leaving exactly their failed requests, costs at batch prices, secrets kept out."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lvlmva.plugins.lvlm.batch_transport import OpenAIBatchTransport
from lvlmva.plugins.lvlm.openai_backend import OpenAICritic, OpenAIJudge, estimate_spending
from lvlmva.plugins.lvlm.openai_transport import OpenAITransport
from lvlmva.protocols import RunContext
from lvlmva.records import Critique
from lvlmva.testing.openai_server import (
    BatchOutcome,
    ScriptedOpenAIServer,
    judge_answer_from_critique,
    synthetic_requests,
)
from lvlmva.testing.settings import decoy_mnist_settings

COLORS = ("red", "blue", "green")
FAST = dict(api_key_env="", timeout_s=5.0, backoff_initial_s=0.01, backoff_max_s=0.05)
BATCH = dict(api="batch", batch_poll_s=0.01)
PRICES = {"priced": {"prompt_per_1k": 1.0, "completion_per_1k": 10.0}}


def _critic(server: ScriptedOpenAIServer, **kw) -> OpenAICritic:
    return OpenAICritic(OpenAICritic.Options(base_url=server.base_url, **{**FAST, **BATCH, **kw}))


def _judge(server: ScriptedOpenAIServer, **kw) -> OpenAIJudge:
    return OpenAIJudge(OpenAIJudge.Options(base_url=server.base_url, **{**FAST, **BATCH, **kw}))


def _ctx(tmp_path: Path, name: str) -> RunContext:
    run = tmp_path / name
    run.mkdir()
    return RunContext(
        seed=0, device=torch.device("cpu"), run_dir=run, stage_dir=run, cache_dir=run / "cache"
    )


def _records(ctx: RunContext) -> list[Path]:
    return sorted((ctx.cache_dir / "batches").glob("*.json"))


def _planned(plan: object) -> int:
    """The requests a plan says it sends (0 for "sends no requests")."""
    found = re.search(r"\): sends (\d+) requests?", str(plan))
    return int(found.group(1)) if found else 0


def _lines(server: ScriptedOpenAIServer, upload: int) -> list[dict]:
    return [json.loads(line) for line in server.uploads[upload].content.decode().splitlines()]


# -- the quick path -----------------------------------------------------------------------------


def test_a_critic_run_through_a_batch_gives_the_chat_answers_in_one_batch(tmp_path, capsys):
    requests = synthetic_requests(5, COLORS)
    chat_ctx, ctx = _ctx(tmp_path, "chat"), _ctx(tmp_path, "batch")
    with ScriptedOpenAIServer(batch_delay_s=0.2) as server:
        by_chat = _critic(server, api="chat").critique(requests, chat_ctx)
        assert server.count == 5 and server.batches_created == 0
        server.reset()

        critic = _critic(server)
        plan = critic.plan(requests, ctx)
        assert str(plan).startswith(
            "critic (openai gpt-4o): sends 5 requests (5 missing), as one batch of OpenAI's Batch API"
        )
        by_batch = critic.critique(requests, ctx)
        assert [c.text for c in by_batch] == [c.text for c in by_chat]
        assert all(
            c.failure is None and c.usage.requests == 1 and c.usage.prompt_tokens > 0
            for c in by_batch
        )
        assert server.count == 0  # no synchronous request
        assert server.batches_created == server.files_uploaded == 1
        assert server.batch_line_count == _planned(plan) == 5
        # the uploaded file: one line per request, its body what a chat request would send
        lines = _lines(server, 0)
        transport = critic.transport(ctx)
        assert isinstance(transport, OpenAIBatchTransport)
        jobs = critic._jobs(requests, ctx, transport, None)
        assert [line["body"] for line in lines] == [transport.body(j.chat) for j in jobs]
        assert [line["custom_id"] for line in lines] == transport.custom_ids([j.chat for j in jobs])
        assert all(
            line["method"] == "POST" and line["url"] == "/v1/chat/completions" for line in lines
        )
        assert server.uploads[0].purpose == "batch"
        [created] = server.batch_creates
        assert (
            created.body["completion_window"] == "24h"
            and created.body["endpoint"] == "/v1/chat/completions"
        )
        assert _records(ctx) == []  # delivered: the record is cleared
        err = capsys.readouterr().err
        batch_id = created.batch_id
        assert f"critic: batch {batch_id} created for 5 requests" in err
        assert (
            f"critic: batch {batch_id} in_progress:" in err
            and f"critic: batch {batch_id} completed: 5 of 5 done, 0 failed" in err
        )

        # a second run asks nothing
        assert (
            str(critic.plan(requests, ctx))
            == "critic (openai gpt-4o): sends no requests; 5 answers from the response cache"
        )
        again = critic.critique(requests, ctx)
        assert [c.text for c in again] == [c.text for c in by_chat]
        assert all(c.usage.cache_hits == 1 for c in again)
        assert server.batches_created == 1 and server.files_uploaded == 1 and server.count == 0


def test_cache_keys_do_not_change_with_the_api(tmp_path):
    requests = synthetic_requests(3, COLORS)
    ctx = _ctx(tmp_path, "run")
    with ScriptedOpenAIServer() as server:
        chat, batch = _critic(server, api="chat"), _critic(server)
        chat_t, batch_t = chat.transport(ctx), batch.transport(ctx)
        assert type(chat_t) is OpenAITransport and isinstance(batch_t, OpenAIBatchTransport)
        chats = [j.chat for j in chat._jobs(requests, ctx, chat_t, None)]
        assert [chat_t.key_parts(c) for c in chats] == [batch_t.key_parts(c) for c in chats]
        # answers had through a batch serve chat mode, and the reverse
        batch.critique(requests[:2], ctx)
        assert server.batches_created == 1
        chat.critique(requests, ctx)
        assert server.count == 1  # only the third
        assert batch.critique(requests, ctx) and server.batches_created == 1
        # the judge too: chat answers reused by the batch judge
        critiques = chat.critique(requests, ctx)
        _judge(server, api="chat").judge(critiques, ctx)
        asked = server.count
        verdicts = _judge(server).judge(critiques, ctx)
        assert all(v.ok for v in verdicts) and server.count == asked and server.batches_created == 1


# -- a run stopped while its batch is pending ---------------------------------------------------

KILLED_BATCH_RUN = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from lvlmva.protocols import RunContext
    from lvlmva.plugins.lvlm.openai_backend import OpenAICritic
    from lvlmva.testing.openai_server import synthetic_requests
    base_url, run_dir, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    ctx = RunContext(seed=0, device=torch.device("cpu"), run_dir=run_dir, stage_dir=run_dir,
                     cache_dir=run_dir / "cache")
    options = OpenAICritic.Options(base_url=base_url, api_key_env="", api="batch", batch_poll_s=0.05)
    OpenAICritic(options).critique(synthetic_requests(n, ("red", "blue", "green")), ctx)
    print("finished", flush=True)
    """
)


def _wait_for_record(ctx: RunContext, proc: subprocess.Popen, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while not _records(ctx):
        assert time.monotonic() < deadline and proc.poll() is None, "no batch was recorded"
        time.sleep(0.01)
    return json.loads(_records(ctx)[0].read_text())


def _stop_once_recorded(plugin, items, ctx: RunContext, stop: bool = True) -> None:
    """Run ``plugin``'s flow and cancel it as soon as its batch is recorded (as a user's Ctrl-C
    or a stopped job does); with ``stop`` False let it finish."""

    async def run() -> None:
        task = asyncio.ensure_future(plugin._flow(items, ctx))
        deadline = time.monotonic() + 30
        while not _records(ctx):
            assert time.monotonic() < deadline and not task.done(), "no batch was recorded"
            await asyncio.sleep(0.005)
        if stop:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            await task

    asyncio.run(run())


def _finish_on_the_same_batch(server, ctx, requests, batch_id, capsys):
    """The rerun: it says it waits for the recorded batch, uploads and sends nothing, and
    finishes with every answer from that batch."""
    critic = _critic(server, batch_poll_s=0.05)
    assert f"all are in batch {batch_id}, submitted by an earlier run" in str(
        critic.plan(requests, ctx)
    )
    critiques = critic.critique(requests, ctx)
    assert all(c.failure is None and c.text.count("Verdict:") == 3 for c in critiques)
    assert server.batches_created == server.files_uploaded == 1 and server.count == 0
    assert server.batch_line_count == len(requests)
    assert server.batch(batch_id)["status"] == "completed"
    assert f"re-attaching to batch {batch_id}" in capsys.readouterr().err
    assert _records(ctx) == []
    assert _planned(critic.plan(requests, ctx)) == 0


def test_a_run_killed_while_its_batch_is_pending_is_finished_on_the_same_batch(tmp_path, capsys):
    n, ctx = 4, _ctx(tmp_path, "run")
    with ScriptedOpenAIServer(batch_delay_s=1.5) as server:
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLED_BATCH_RUN, server.base_url, str(ctx.run_dir), str(n)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            record = _wait_for_record(ctx, proc)
        finally:
            proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        assert b"finished" not in out
        batch_id = record["batch_id"]
        assert server.batch(batch_id)["status"] in ("validating", "in_progress")
        assert record["role"] == "critic" and len(record["custom_ids"]) == n
        _finish_on_the_same_batch(server, ctx, synthetic_requests(n, COLORS), batch_id, capsys)


def test_a_run_cancelled_while_its_batch_is_pending_is_finished_on_the_same_batch(tmp_path, capsys):
    requests, ctx = synthetic_requests(3, COLORS), _ctx(tmp_path, "run")
    with ScriptedOpenAIServer(batch_delay_s=0.5) as server:
        _stop_once_recorded(_critic(server), requests, ctx)
        batch_id = server.batch_creates[0].batch_id
        assert json.loads(_records(ctx)[0].read_text())["batch_id"] == batch_id
        assert (
            f"stopped while batch {batch_id} runs; a new run with the same settings picks it up"
            in capsys.readouterr().err
        )
        _finish_on_the_same_batch(server, ctx, requests, batch_id, capsys)


def test_a_recorded_batch_the_server_no_longer_has_is_said_and_submitted_anew(tmp_path, capsys):
    requests, ctx = synthetic_requests(2, COLORS), _ctx(tmp_path, "run")
    with ScriptedOpenAIServer(batch_delay_s=5.0) as gone:
        _stop_once_recorded(_critic(gone), requests, ctx)
        old = gone.batch_creates[0].batch_id
    with ScriptedOpenAIServer() as server:  # another server: it knows no such batch
        url = server.base_url
        critiques = _critic(server).critique(requests, ctx)
        assert all(c.failure is None for c in critiques)
        assert server.batches_created == 1 and server.batch_line_count == 2 and server.count == 0
    err = capsys.readouterr().err
    assert (
        f"critic: batch {old} (recorded " in err
        and f"no longer exists at {url}: submitting anew" in err
    )
    assert _records(ctx) == []


# -- expired, partly failed and failed batches ---------------------------------------------------


def test_an_expired_batch_leaves_exactly_its_unanswered_requests(tmp_path):
    requests, ctx = synthetic_requests(5, COLORS), _ctx(tmp_path, "run")
    with ScriptedOpenAIServer(batch_outcomes=[BatchOutcome.expire(after=2)]) as server:
        critic = _critic(server)
        first = critic.critique(requests, ctx)
        batch_id = server.batch_creates[0].batch_id
        answered = [c for c in first if c.failure is None]
        failed = [c for c in first if c.failure is not None]
        assert len(answered) == 2 and len(failed) == 3 and server.batch_line_count == 2
        assert all(c.retryable and c.usage.requests == 0 for c in failed)  # never run: not paid
        assert {c.failure for c in failed} == {
            f"batch {batch_id} expired (completion window 24h) before answering it at {server.base_url}"
        }
        assert _records(ctx) == []

        plan = critic.plan(requests, ctx)
        assert "sends 3 requests (3 failed in transport)" in str(plan)
        assert "2 answers from the response cache" in str(plan)
        second = critic.critique(requests, ctx)
        assert all(c.failure is None for c in second)
        assert server.batches_created == 2 and server.count == 0
        assert (
            server.batch_line_count - 2 == _planned(plan) == len(_lines(server, 1)) == len(failed)
        )
        # the new batch holds exactly the requests the expired one did not answer
        first_ids = [line["custom_id"] for line in _lines(server, 0)]
        ran = {r.custom_id for r in server.batch_lines[:2]}
        assert {line["custom_id"] for line in _lines(server, 1)} == set(first_ids) - ran
        assert _planned(critic.plan(requests, ctx)) == 0


def test_a_partly_failed_batch_leaves_exactly_its_failed_lines_matched_by_custom_id(tmp_path):
    requests, ctx = synthetic_requests(6, COLORS), _ctx(tmp_path, "run")
    faults = [None, "500", None, "429", None, None]
    with ScriptedOpenAIServer(batch_faults=faults, shuffle_batch_output=True) as server:
        critic = _critic(server)
        first = critic.critique(requests, ctx)
        batch_id = server.batch_creates[0].batch_id
        failed_ids = {server.batch_lines[1].custom_id, server.batch_lines[3].custom_id}
        ids = critic.transport(ctx).custom_ids(
            [j.chat for j in critic._jobs(requests, ctx, critic.transport(ctx), None)]
        )
        assert {ids[i] for i, c in enumerate(first) if c.failure is not None} == failed_ids
        failures = sorted(c.failure for c in first if c.failure is not None)
        assert failures == [
            f"HTTP 429: Rate limit reached (scripted). in batch {batch_id} at {server.base_url}",
            f"HTTP 500: internal error (scripted) in batch {batch_id} at {server.base_url}",
        ]
        # the answers went to the samples they belong to, whatever the output file's order
        chat_ctx = _ctx(tmp_path, "chat")
        by_chat = _critic(server, api="chat").critique(requests, chat_ctx)
        assert all(
            a.text == b.text for a, b in zip(first, by_chat, strict=True) if a.failure is None
        )

        plan = critic.plan(requests, ctx)
        assert "sends 2 requests (2 failed in transport)" in str(plan)
        second = critic.critique(requests, ctx)
        assert [c.text for c in second] == [c.text for c in by_chat]
        assert server.batches_created == 2 and server.batch_line_count == 6 + _planned(plan) == 8
        assert {line["custom_id"] for line in _lines(server, 1)} == failed_ids


def test_a_batch_that_fails_validation_fails_every_request_retryably_and_is_submitted_again(
    tmp_path,
):
    requests, ctx = synthetic_requests(3, COLORS), _ctx(tmp_path, "run")
    with ScriptedOpenAIServer(
        batch_outcomes=[
            BatchOutcome.fail(code="token_limit_exceeded", message="Enqueued token limit reached.")
        ]
    ) as server:
        critic = _critic(server)
        first = critic.critique(requests, ctx)
        batch_id = server.batch_creates[0].batch_id
        assert {c.failure for c in first} == {
            f"batch {batch_id} failed: token_limit_exceeded: Enqueued token limit reached. at {server.base_url}"
        }
        assert all(c.retryable for c in first) and _records(ctx) == []
        assert "sends 3 requests (3 failed in transport)" in str(critic.plan(requests, ctx))
        assert all(c.failure is None for c in critic.critique(requests, ctx))
        assert server.batches_created == 2 and server.batch_line_count == 3 and server.count == 0


def test_files_and_batches_calls_are_retried_and_a_lost_create_reply_makes_no_second_batch(
    tmp_path,
):
    requests, ctx = synthetic_requests(2, COLORS), _ctx(tmp_path, "run")
    # the upload fails once (500); the create call makes its batch but its reply is cut short
    with ScriptedOpenAIServer(api_faults=["500", None, "truncate", None, "503"]) as server:
        critiques = _critic(server).critique(requests, ctx)
        assert all(c.failure is None for c in critiques)
        assert server.batches_created == 1 and server.files_uploaded == 1 and server.count == 0


def test_a_server_that_refuses_batches_fails_every_request_retryably(tmp_path):
    requests, ctx = synthetic_requests(2, COLORS), _ctx(tmp_path, "run")
    with ScriptedOpenAIServer() as server:
        critiques = _critic(server, batch_completion_window="1h").critique(requests, ctx)
        assert {c.failure for c in critiques} == {
            "Batch API: creating the batch: HTTP 400: Invalid value for 'completion_window': only "
            f"'24h' is supported. at {server.base_url}"
        }
        assert all(c.retryable for c in critiques) and _records(ctx) == []
        assert server.files_uploaded == 1 and server.batches_created == 0


# -- costs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [0.5, 0.25])
def test_costs_are_at_batch_prices(tmp_path, capsys, factor):
    requests = synthetic_requests(2, COLORS)
    with ScriptedOpenAIServer() as server:
        kw = dict(model="priced", prices=PRICES)
        chat = _critic(server, api="chat", **kw).critique(requests, _ctx(tmp_path, "chat"))
        batch = _critic(server, batch_price_factor=factor, **kw).critique(
            requests, _ctx(tmp_path, "batch")
        )
    for a, b in zip(chat, batch, strict=True):
        assert a.usage.prompt_tokens == b.usage.prompt_tokens
        assert a.usage.completion_tokens == b.usage.completion_tokens
        assert b.usage.cost_usd == pytest.approx(factor * a.usage.cost_usd) and a.usage.cost_usd > 0
    total = sum(c.usage.cost_usd for c in batch)
    assert (
        f"${total:.4f} at batch prices (batch_price_factor = {factor:g} of prices)"
        in capsys.readouterr().err
    )


def test_estimates_and_budgets_are_at_batch_prices():
    chat = OpenAICritic.Options(model="gpt-4o")
    batch = OpenAICritic.Options(model="gpt-4o", api="batch")
    assert estimate_spending("critic", batch, 64).cost_usd == pytest.approx(
        estimate_spending("critic", chat, 64).cost_usd / 2
    )
    assert (
        estimate_spending("critic", batch, 64).requests
        == estimate_spending("critic", chat, 64).requests
    )
    budget = estimate_spending("critic", chat, 64).cost_usd * 0.75  # enough at batch prices only
    assert OpenAICritic(
        OpenAICritic.Options(model="gpt-4o", api_key_env="", max_cost_usd=budget)
    ).preflight(64)
    assert (
        OpenAICritic(
            OpenAICritic.Options(model="gpt-4o", api_key_env="", api="batch", max_cost_usd=budget)
        ).preflight(64)
        == []
    )
    [problem] = OpenAIJudge(
        OpenAIJudge.Options(api_key_env="", api="batch", max_cost_usd=1e-6)
    ).preflight(64)
    assert "at batch prices: 0.5 x judge.prices" in problem


# -- the judge --------------------------------------------------------------------------------------


def _invalid_then_repaired(body: dict) -> str:
    """A judge whose first answer is prose and whose repaired answer is valid."""
    if any(m["role"] == "assistant" for m in body["messages"]):
        return judge_answer_from_critique({**body, "messages": body["messages"][:2]})
    return "Red looks fine to me, blue is a decoy."


def test_the_judge_through_batches_sends_its_repairs_as_a_second_batch(tmp_path):
    ctx = _ctx(tmp_path, "run")
    tail = "\n\nBlue: the corner square. Verdict: no\n\nGreen: a stroke. Verdict: yes"
    texts = [f"Red: stroke {i} of the digit. Verdict: yes{tail}" for i in range(3)]
    critiques = [
        Critique(i, COLORS, text, family="decoy-mnist", label="7", model="m")
        for i, text in enumerate(texts)
    ]
    assert len(set(texts)) == 3
    with ScriptedOpenAIServer(answer=_invalid_then_repaired) as server:
        judge = _judge(server)
        plan = judge.plan(critiques, ctx)
        assert "sends 3 requests (3 missing) and up to 3 more to repair" in str(plan)
        assert (
            "as batches of OpenAI's Batch API (one, and one per repair round) at batch prices"
            in str(plan)
        )
        verdicts = judge.judge(critiques, ctx)
        assert all(v.ok and v.attempts == 2 and v.relevant == (True, False, True) for v in verdicts)
        assert server.batches_created == 2 and server.count == 0
        assert server.batch_line_count == 2 * _planned(plan) == 6
        repairs = _lines(server, 1)
        assert all(
            [m["role"] for m in line["body"]["messages"]] == ["system", "user", "assistant", "user"]
            for line in repairs
        )
        assert all(line["custom_id"].startswith("judge-") for line in repairs)
        assert _planned(judge.plan(critiques, ctx)) == 0 and _records(ctx) == []
        assert [v.relevant for v in judge.judge(critiques, ctx)] == [v.relevant for v in verdicts]
        assert server.batches_created == 2


# -- secrets ----------------------------------------------------------------------------------------


def test_the_api_key_reaches_no_record_message_or_failure(tmp_path, capsys, monkeypatch):
    secret = "sk-test-DO-NOT-LEAK-batch-7c1d"
    monkeypatch.setenv("LVLMVA_TEST_KEY", secret)
    requests, ctx = synthetic_requests(2, COLORS), _ctx(tmp_path, "run")
    with ScriptedOpenAIServer(batch_faults=["400", None], batch_delay_s=0.3) as server:
        critic = _critic(server, api_key_env="LVLMVA_TEST_KEY")
        _stop_once_recorded(critic, requests, ctx)
        record = _records(ctx)[0].read_text()
        assert secret not in record and server.base_url in record
        assert server.batch_creates[0].headers["authorization"] == f"Bearer {secret}"
        # the rerun re-attaches; the server echoes the key in a 400
        critiques = critic.critique(requests, ctx)
        [failure] = [c.failure for c in critiques if c.failure]
        assert failure.startswith(
            "HTTP 400: bad request (scripted); you sent Authorization: Bearer [redacted]"
        )
        again = critic.critique(requests, ctx)  # the failed one asked again, and answered
        assert all(c.failure is None for c in again)
        assert server.batches_created == 2 and server.count == 0
    err = capsys.readouterr().err
    assert secret not in err
    lines = (ctx.run_dir / "transcripts.jsonl").read_text()
    assert secret not in lines and "[redacted]" in lines


# -- a whole run ------------------------------------------------------------------------------------


def _run_settings(cache: Path, url: str, api: str) -> str:
    """The small DecoyMNIST run on 400 training images, its critic and judge asking ``url``
    through ``api`` (``chat`` or ``batch``)."""
    ask = {"base_url": url, "api_key_env": "", "api": api, "batch_poll_s": 0.02}
    critic, judge = {"plugin": "openai", "model": "test-critic", **ask}, {"plugin": "openai", "model": "test-judge", **ask}
    return decoy_mnist_settings(cache, critic=critic, judge=judge)


def _compose(tmp_path: Path, name: str, url: str, api: str, cache: str) -> tuple[int, dict]:
    """One ``lvlmva compose`` run: its exit code and its judge's verdicts by sample."""
    from lvlmva.cli import main

    settings = tmp_path / f"{name}.toml"
    settings.write_text(_run_settings(tmp_path / cache, url, api))
    run_dir = tmp_path / name
    code = main(["compose", str(settings), "--out", str(run_dir), "--quiet"])
    lines = [json.loads(line) for line in (run_dir / "transcripts.jsonl").read_text().splitlines()]
    verdicts = {line["sample_id"]: line["verdicts"] for line in lines if line["stage"] == "judge"}
    return code, verdicts


def test_a_whole_run_through_batches_gives_the_chat_verdicts(tmp_path, capsys, torch_global_state):
    pytest.importorskip("mlxtend")
    from lvlmva.cli import EXIT_OK

    with ScriptedOpenAIServer(batch_delay_s=0.05) as server:
        code, by_chat = _compose(tmp_path, "chat", server.base_url, "chat", "chat-cache")
        assert code == EXIT_OK and len(by_chat) == 6
        capsys.readouterr()
        server.reset()

        code, by_batch = _compose(tmp_path, "batch", server.base_url, "batch", "batch-cache")
        err = capsys.readouterr().err
        assert code == EXIT_OK and by_batch == by_chat
        planned = sum(int(n) for n in re.findall(r"\): sends (\d+) requests?", err))
        assert (
            "critic (openai test-critic): sends 6 requests (6 missing), as one batch of OpenAI's Batch API"
            in err
        )
        # one batch for the critic, one for the judge
        assert server.count == 0 and server.batches_created == server.files_uploaded == 2
        assert server.batch_line_count == planned
        results = json.loads((tmp_path / "batch" / "results.json").read_text())
        assert results["usage"]["requests"] == planned and results["alignment"]["failed"] == 0

        # again: nothing asked; and the chat run's cache serves a batch run
        code, again = _compose(tmp_path, "batch", server.base_url, "batch", "batch-cache")
        code2, shared = _compose(tmp_path, "shared", server.base_url, "batch", "chat-cache")
        assert code == code2 == EXIT_OK and again == shared == by_chat
        assert (
            server.count == 0 and server.batches_created == 2 and server.batch_line_count == planned
        )
