"""OpenAI-compatible critic and judge against the local scripted server: requests, retries,
validation with repair, cache, usage, transcripts, secrets, and the reliability scenarios."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from lvlmva.plugins.lvlm.cache import ResponseCache
from lvlmva.plugins.lvlm.openai_backend import (
    ModelPrice,
    OpenAICritic,
    OpenAIJudge,
    cost_usd,
    retry_after_seconds,
)
from lvlmva.plugins.lvlm.prompts import load_template, render_critic_prompt, render_judge_prompt
from lvlmva.protocols import RunContext
from lvlmva.records import Critique
from lvlmva.registry import get_registry
from lvlmva.testing.openai_server import (
    ScriptedOpenAIServer,
    critic_answer,
    data_url_bytes,
    judge_answer_from_critique,
    synthetic_requests,
)

COLORS = ("red", "blue", "green")
FAST = dict(api_key_env="", timeout_s=2.0, backoff_initial_s=0.01, backoff_max_s=0.05)
VALID = json.dumps(
    {"output": [{"color": c, "verdict": "no" if c == "blue" else "yes"} for c in COLORS]}
)
EXPECTED = (True, False, True)


def _blue_is_spurious(body: dict) -> str:
    """A consistent critic + judge: blue is always the spurious cluster."""
    has_images = any(isinstance(m["content"], list) for m in body["messages"])
    if has_images:
        return critic_answer(body, verdict=lambda digest, color: color != "blue")
    return judge_answer_from_critique(body)


def _critic(server: ScriptedOpenAIServer, **kw) -> OpenAICritic:
    return OpenAICritic(OpenAICritic.Options(base_url=server.base_url, **{**FAST, **kw}))


def _judge(server: ScriptedOpenAIServer, **kw) -> OpenAIJudge:
    return OpenAIJudge(OpenAIJudge.Options(base_url=server.base_url, **{**FAST, **kw}))


def _critique(sample_id: int = 0, text: str = "Red: yes. Blue: decoy. Green: yes.") -> Critique:
    return Critique(sample_id, COLORS, text, family="decoy-mnist", label="7", model="m")


def _transcripts(ctx: RunContext) -> list[dict]:
    path = ctx.run_dir / "transcripts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# -- plugin surface -----------------------------------------------------------------------------


@pytest.mark.parametrize(("role", "cls"), [("critic", OpenAICritic), ("judge", OpenAIJudge)])
def test_registered_with_documented_options(role, cls):
    assert get_registry().get(role, "openai") is cls
    for name, field in cls.Options.model_fields.items():
        assert field.description, f"{cls.__name__}.Options.{name} lacks a description"
    with pytest.raises(ValueError):
        cls.Options(no_such_option=1)
    assert OpenAICritic.accepts_images and not OpenAICritic.needs_true_masks
    assert OpenAIJudge.Options().model == "gpt-4o-mini" and OpenAICritic.Options().model == "gpt-4o"


def test_retry_after_parsing():
    assert retry_after_seconds({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 < retry_after_seconds({"retry-after": later}) <= 30
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None and retry_after_seconds(None) is None


def test_cost_uses_longest_matching_price():
    prices = {"gpt-4o": ModelPrice(prompt_per_1k=1.0, completion_per_1k=2.0),
              "gpt-4o-mini": ModelPrice(prompt_per_1k=0.1, completion_per_1k=0.2)}  # fmt: skip
    assert cost_usd(prices, "gpt-4o", 1000, 500) == pytest.approx(2.0)
    assert cost_usd(prices, "gpt-4o-2024-08-06", 1000, 0) == pytest.approx(1.0)
    assert cost_usd(prices, "gpt-4o-mini-2024-07-18", 1000, 1000) == pytest.approx(0.3)
    assert cost_usd(prices, "qwen2.5-vl", 1000, 1000) is None


# -- critic -------------------------------------------------------------------------------------


def test_critic_sends_prompt_images_and_params(ctx):
    requests = synthetic_requests(3, COLORS)
    with ScriptedOpenAIServer(answer=_blue_is_spurious) as server:
        out = _critic(server, model="vision-x", temperature=0.3, max_tokens=77).critique(
            requests, ctx
        )
        bodies = sorted(
            (r.body for r in server.requests), key=lambda b: b["messages"][0]["content"][0]["text"]
        )
    assert [c.sample_id for c in out] == [0, 1, 2]
    assert all(c.failure is None and c.text.count("Verdict:") == 3 for c in out)
    assert all(
        c.family == "decoy-mnist" and c.label == r.label and c.model == "vision-x"
        for c, r in zip(out, requests, strict=True)
    )
    template = load_template("decoy-mnist", "critic")
    by_prompt = {render_critic_prompt(template, r): r for r in requests}
    for body in bodies:
        assert (
            body["model"] == "vision-x" and body["temperature"] == 0.3 and body["max_tokens"] == 77
        )
        assert body["seed"] == ctx.seed
        text, *images = body["messages"][0]["content"]
        request = by_prompt[text["text"]]
        assert [data_url_bytes(i["image_url"]["url"]) for i in images] == list(
            request.rendered.images
        )
        assert all(i["image_url"]["url"].startswith("data:image/png;base64,") for i in images)
    assert all(c.usage.requests == 1 and c.usage.prompt_tokens > 0 for c in out)


def test_seed_can_be_left_out(ctx):
    with ScriptedOpenAIServer(answer="Red: fine") as server:
        _critic(server, send_seed=False).critique(synthetic_requests(1, COLORS), ctx)
        assert "seed" not in server.requests[0].body


def test_transient_errors_are_retried_honouring_retry_after(ctx):
    with ScriptedOpenAIServer(
        answer="Red: ok", faults=["429", "500", "truncate", None], retry_after_s=0.3
    ) as server:
        start = time.perf_counter()
        out = _critic(server, backoff_initial_s=0.0).critique(synthetic_requests(1, COLORS), ctx)
        elapsed = time.perf_counter() - start
        assert server.count == 4
    assert out[0].text == "Red: ok" and out[0].usage.requests == 4
    assert elapsed >= 0.3  # the 429's Retry-After was waited out even with zero backoff
    line = _transcripts(ctx)[0]
    assert line["attempts"] == 4 and len(line["errors"]) == 3
    assert "HTTP 429" in line["errors"][0] and "HTTP 500" in line["errors"][1]
    assert "unreadable" in line["errors"][2]


def test_timeout_is_retried(ctx):
    with ScriptedOpenAIServer(
        answer="Red: ok", faults=["delay", None], fault_delay_s=1.0
    ) as server:
        out = _critic(server, timeout_s=0.3).critique(synthetic_requests(1, COLORS), ctx)
    assert out[0].text == "Red: ok"
    assert "timed out" in _transcripts(ctx)[0]["errors"][0]


def test_exhausted_attempts_become_a_failure_not_an_exception(ctx):
    requests = synthetic_requests(2, COLORS)
    with ScriptedOpenAIServer(
        answer="Red: ok", faults=lambda i, body: "500" if "digit 0" in json.dumps(body) else None
    ) as server:
        out = _critic(server, max_attempts=3).critique(requests, ctx)
        assert server.count == 4
    assert (
        out[0].text is None
        and "no answer after 3 attempts" in out[0].failure
        and "HTTP 500" in out[0].failure
    )
    assert out[1].text == "Red: ok"
    assert out[0].usage.requests == 3


def test_client_errors_are_not_retried(ctx):
    with ScriptedOpenAIServer(faults=["400", None]) as server:
        out = _critic(server).critique(synthetic_requests(1, COLORS), ctx)
        assert server.count == 1
    assert "HTTP 400" in out[0].failure and "not retried" in out[0].failure


def test_empty_answer_is_a_failure_and_not_cached(ctx):
    with ScriptedOpenAIServer(answer="") as server:
        critic = _critic(server)
        assert critic.critique(synthetic_requests(1, COLORS), ctx)[0].failure.startswith(
            "critic returned an empty answer"
        )
        critic.critique(synthetic_requests(1, COLORS), ctx)
        assert server.count == 2


def test_concurrency_is_bounded_and_used(ctx):
    with ScriptedOpenAIServer(answer="Red: ok", latency_s=0.2) as server:
        start = time.perf_counter()
        _critic(server, concurrency=4).critique(synthetic_requests(8, COLORS), ctx)
        elapsed = time.perf_counter() - start
        assert server.max_in_flight == 4
    assert elapsed < 0.4 * 1.5 + 0.5  # two waves of 0.2 s, not eight


def test_runs_inside_a_running_event_loop(ctx):
    with ScriptedOpenAIServer(answer="Red: ok") as server:
        critic = _critic(server)

        async def notebook_cell():
            return critic.critique(synthetic_requests(1, COLORS), ctx)

        assert asyncio.run(notebook_cell())[0].text == "Red: ok"


def test_missing_key_variable_fails_before_any_request(ctx, monkeypatch):
    monkeypatch.delenv("LVLMVA_TEST_ABSENT_KEY", raising=False)
    with ScriptedOpenAIServer() as server:
        critic = _critic(server, api_key_env="LVLMVA_TEST_ABSENT_KEY")
        with pytest.raises(RuntimeError, match="LVLMVA_TEST_ABSENT_KEY"):
            critic.critique(synthetic_requests(1, COLORS), ctx)
        assert server.count == 0


def test_unknown_family_fails_before_any_request(ctx):
    requests = synthetic_requests(1, COLORS, family="no-such-family")
    with ScriptedOpenAIServer() as server:
        with pytest.raises(ValueError, match="no-such-family"):
            _critic(server).critique(requests, ctx)
        assert server.count == 0
        # The family option overrides the samples' family.
        assert _critic(server, family="knee").critique(requests, ctx)[0].failure is None
        assert "radiograph" in server.requests[0].body["messages"][0]["content"][0]["text"]


# -- judge --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json_schema", "json_object", "none"])
def test_judge_verdicts_and_response_format(ctx, fmt):
    with ScriptedOpenAIServer(answer=VALID) as server:
        out = _judge(server, response_format=fmt, model="judge-x").judge([_critique(4)], ctx)
        body = server.requests[0].body
    assert out[0].relevant == EXPECTED and out[0].sample_id == 4 and out[0].attempts == 1
    instructions, user = render_judge_prompt(load_template("decoy-mnist", "judge"), _critique(4))
    assert body["messages"] == [
        {"role": "system", "content": instructions},
        {"role": "user", "content": user},
    ]
    if fmt == "none":
        assert "response_format" not in body
    elif fmt == "json_object":
        assert body["response_format"] == {"type": "json_object"}
    else:
        schema = body["response_format"]["json_schema"]
        assert schema["strict"] is True
        assert schema["schema"]["properties"]["output"]["items"]["properties"]["color"][
            "enum"
        ] == list(COLORS)


def test_judge_repairs_an_invalid_answer_with_the_error_fed_back(ctx):
    with ScriptedOpenAIServer(answer=["The red one is fine, blue is not.", VALID]) as server:
        out = _judge(server).judge([_critique()], ctx)
        second = server.requests[1].body["messages"]
    assert out[0].relevant == EXPECTED and out[0].attempts == 2
    assert second[2] == {"role": "assistant", "content": "The red one is fine, blue is not."}
    assert second[3]["role"] == "user" and "no JSON object" in second[3]["content"]
    assert "red, blue, green" in second[3]["content"]
    line = _transcripts(ctx)[0]
    assert (
        line["verdicts"] == {"red": "yes", "blue": "no", "green": "yes"}
        and len(line["validation_errors"]) == 1
    )


def test_judge_records_failure_after_repair_and_never_caches_it(ctx):
    bad = json.dumps(
        {"output": [{"color": "red", "verdict": "yes"}, {"color": "blue", "verdict": "no"}]}
    )
    with ScriptedOpenAIServer(answer=bad) as server:
        judge = _judge(server)
        out = judge.judge([_critique()], ctx)
        assert out[0].relevant is None and out[0].attempts == 2
        assert 'missing colour(s) "green"' in out[0].failure
        assert server.count == 2
        judge.judge([_critique()], ctx)  # nothing was cached: asked again
        assert server.count == 4
    assert len(ResponseCache(ctx.cache_dir / "responses.sqlite")) == 0


def test_failed_critique_is_a_failed_verdict_without_requests(ctx):
    failed = Critique(
        2, COLORS, None, failure="critic request failed: HTTP 500", family="decoy-mnist"
    )
    with ScriptedOpenAIServer(answer=VALID) as server:
        out = _judge(server).judge([failed, _critique(3)], ctx)
        assert server.count == 1
    assert out[0].relevant is None and "HTTP 500" in out[0].failure
    assert out[1].relevant == EXPECTED


# -- cache, usage, transcripts ------------------------------------------------------------------


def test_second_run_is_served_from_cache_across_servers(ctx, tmp_path):
    requests = synthetic_requests(4, COLORS)
    with ScriptedOpenAIServer(answer=_blue_is_spurious) as first:
        critiques = _critic(first).critique(requests, ctx)
        verdicts = _judge(first).judge(critiques, ctx)
        assert first.count == 8
    # Another address (base_url is not part of the key) and the same settings: no requests.
    with ScriptedOpenAIServer(answer="never used") as second:
        again = _critic(second).critique(requests, ctx)
        verdicts_again = _judge(second).judge(again, ctx)
        assert second.count == 0
        assert [c.text for c in again] == [c.text for c in critiques]
        assert (
            [v.relevant for v in verdicts_again] == [v.relevant for v in verdicts] == [EXPECTED] * 4
        )
        assert all(c.usage.cache_hits == 1 and c.usage.requests == 0 for c in again)
        # --refresh asks again; another model or template version is another key.
        ctx.refresh = True
        _critic(second).critique(requests[:1], ctx)
        assert second.count == 1
        ctx.refresh = False
        _critic(second, model="other").critique(requests[:1], ctx)
        assert second.count == 2
        mine = tmp_path / "mine.toml"
        text = load_template("decoy-mnist", "critic").text.replace("\n", "\n\n", 1)
        mine.write_text(f'version = "mine/2"\ntext = """{text}"""\n', encoding="utf-8")
        _critic(second, template=str(mine)).critique(requests[:1], ctx)
        assert second.count == 3
        _critic(second, cache=False).critique(requests[:1], ctx)
        assert second.count == 4


def test_cache_dir_option(ctx, tmp_path):
    with ScriptedOpenAIServer(answer="Red: ok") as server:
        _critic(server, cache_dir=tmp_path / "elsewhere").critique(
            synthetic_requests(1, COLORS), ctx
        )
    assert (tmp_path / "elsewhere" / "responses.sqlite").exists()
    assert not (ctx.cache_dir / "responses.sqlite").exists()


def test_usage_and_cost(ctx):
    prices = {"priced": {"prompt_per_1k": 1.0, "completion_per_1k": 10.0}}
    with ScriptedOpenAIServer(answer=VALID) as server:
        out = _judge(server, model="priced", prices=prices).judge([_critique()], ctx)
    u = out[0].usage
    assert u.requests == 1 and u.prompt_tokens > 0 and u.completion_tokens > 0
    assert u.cost_usd == pytest.approx(u.prompt_tokens / 1000 + u.completion_tokens * 10 / 1000)
    with ScriptedOpenAIServer(answer=VALID) as server:
        free = _judge(server, model="local-model").judge([_critique()], ctx)
    assert free[0].usage.cost_usd == 0.0 and free[0].usage.prompt_tokens > 0


def test_transcripts_hold_prompts_images_answers_and_verdicts(ctx):
    requests = synthetic_requests(2, COLORS)
    with ScriptedOpenAIServer(answer=_blue_is_spurious) as server:
        critiques = _critic(server).critique(requests, ctx)
        _judge(server).judge(critiques, ctx)
        _critic(server).critique(requests, ctx)
    lines = _transcripts(ctx)
    assert [line["stage"] for line in lines] == ["critic"] * 2 + ["judge"] * 2 + ["critic"] * 2
    first = next(line for line in lines if line["stage"] == "critic" and line["sample_id"] == 1)
    assert first["images"][0] == {
        "sha256": __import__("hashlib").sha256(requests[1].rendered.original).hexdigest(),
        "file": "render/sample_1_original.png",
    }
    assert first["prompt"].startswith("The images below") and first["answer"] == critiques[1].text
    assert first["cache_hit"] is False and first["attempts"] == 1 and first["latency_s"] > 0
    judged = [line for line in lines if line["stage"] == "judge"]
    assert all(line["verdicts"] == {"red": "yes", "blue": "no", "green": "yes"} for line in judged)
    assert all(line["cache_hit"] for line in lines[4:])


# -- reliability --------------------------------------------------------------------------------


def test_thirty_percent_mixed_failures_every_sample_judged_or_failed_with_reason(ctx):
    n = 24
    requests = synthetic_requests(n, COLORS, seed=3)
    with ScriptedOpenAIServer(
        answer=_blue_is_spurious, fault_rate=0.3, seed=7, retry_after_s=0.02, fault_delay_s=0.6
    ) as server:
        options = dict(timeout_s=0.3, max_attempts=4, concurrency=8)
        critiques = _critic(server, **options).critique(requests, ctx)
        verdicts = _judge(server, **options).judge(critiques, ctx)
        faults = server.fault_counts()
    assert set(faults) == {"429", "500", "delay", "truncate", "prose"}
    assert [v.sample_id for v in verdicts] == list(range(n))
    judged = [v for v in verdicts if v.ok]
    failed = [v for v in verdicts if not v.ok]
    # Never silently all-relevant or all-spurious: a verdict is the scripted truth or a failure.
    assert all(v.relevant == EXPECTED for v in judged)
    assert all(v.failure and len(v.failure) > 20 for v in failed)
    assert len(judged) >= n // 2
    lines = _transcripts(ctx)
    assert len([line for line in lines if line["stage"] == "judge"]) == n
    # Every attempt is accounted for: the server recorded it, or the client gave up on it before
    # the server got to it (a timeout or a dropped connection on a loaded machine).
    attempts = sum(c.usage.requests for c in critiques) + sum(v.usage.requests for v in verdicts)
    errors = [e for line in lines for e in line.get("errors", [])]
    lost = sum("connection error" in e or "timed out" in e for e in errors)
    assert server.count <= attempts <= server.count + lost, errors


KILLED_RUN = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from lvlmva.protocols import RunContext
    from lvlmva.plugins.lvlm.openai_backend import OpenAICritic
    from lvlmva.testing.openai_server import synthetic_requests
    base_url, run_dir, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    ctx = RunContext(seed=0, device=torch.device("cpu"), run_dir=run_dir, stage_dir=run_dir,
                     cache_dir=run_dir / "cache")
    options = OpenAICritic.Options(base_url=base_url, api_key_env="", concurrency=2)
    OpenAICritic(options).critique(synthetic_requests(n, ("red", "blue", "green")), ctx)
    print("finished", flush=True)
    """
)


def test_killed_mid_stage_rerun_reads_received_answers_from_cache(ctx):
    n, kill_after = 12, 5
    with ScriptedOpenAIServer(answer=_blue_is_spurious, latency_s=0.15) as server:
        reached = threading.Event()
        server.on_answer = lambda count: reached.set() if count >= kill_after else None
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLED_RUN, server.base_url, str(ctx.run_dir), str(n)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert reached.wait(timeout=60), proc.communicate(timeout=5)
        time.sleep(0.05)  # let the client store what it has received
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        assert b"finished" not in out
        first_run = server.count
        assert first_run < n

        cache = ResponseCache(ctx.cache_dir / "responses.sqlite")
        stored = len(cache)
        cache.close()
        assert stored >= kill_after - 2  # answers received before the kill were kept
        server.reset()
        critiques = _critic(server, concurrency=2).critique(synthetic_requests(n, COLORS), ctx)
        assert server.count == n - stored  # only the missing ones were asked again
        assert sum(c.usage.cache_hits for c in critiques) == stored
        assert all(c.text and c.text.count("Verdict:") == 3 for c in critiques)


def test_api_key_reaches_no_file_and_no_log(ctx, monkeypatch, capfd, caplog, tmp_path):
    secret = "sk-test-DO-NOT-LEAK-4f9a2c"
    monkeypatch.setenv("LVLMVA_TEST_KEY", secret)
    caplog.set_level("DEBUG")
    options = dict(FAST, api_key_env="LVLMVA_TEST_KEY", timeout_s=0.3)
    requests = synthetic_requests(6, COLORS)
    with ScriptedOpenAIServer(
        answer=_blue_is_spurious,
        faults=lambda i, body: "400" if i == 0 else ("429" if i % 3 == 1 else None),
        retry_after_s=0.01,
    ) as server:
        critiques = OpenAICritic(
            OpenAICritic.Options(base_url=server.base_url, **options)
        ).critique(requests, ctx)
        verdicts = OpenAIJudge(OpenAIJudge.Options(base_url=server.base_url, **options)).judge(
            critiques, ctx
        )
        # The key does travel to the server, by design, in the Authorization header.
        assert server.requests[0].headers["authorization"] == f"Bearer {secret}"
    leaked_reason = [c.failure for c in critiques if c.failure]
    assert leaked_reason and "***" in leaked_reason[0]  # the server echoed it; we redacted it
    assert all(secret not in (v.failure or "") for v in verdicts)
    captured = capfd.readouterr()
    assert secret not in captured.out + captured.err + caplog.text
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "responses.sqlite" for p in files) and any(
        p.name == "transcripts.jsonl" for p in files
    )
    for path in files:
        assert secret.encode() not in path.read_bytes(), path
