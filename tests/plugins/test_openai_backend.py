"""OpenAI-compatible critic and judge against the local scripted server: requests, retries,
validation with repair, cache, usage, transcripts, secrets, and the reliability scenarios."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from pydantic import ValidationError

from lvlmva.plugins.lvlm.cache import ResponseCache
from lvlmva.plugins.lvlm.openai_backend import (
    ModelPrice,
    OpenAICritic,
    OpenAIJudge,
    cost_usd,
    estimate_spending,
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
    fault_when,
    judge_answer_from_critique,
    synthetic_requests,
)

COLORS = ("red", "blue", "green")
FAST = dict(api_key_env="", timeout_s=2.0, backoff_initial_s=0.01, backoff_max_s=0.05)
VALID = json.dumps(
    {"output": [{"color": c, "verdict": "no" if c == "blue" else "yes"} for c in COLORS]}
)
EXPECTED = (True, False, True)
#: a critic answer that can be used: it discusses every colour of COLORS
WHOLE = "Red: on the digit. Verdict: yes\nBlue: the corner square. Verdict: no\nGreen: a stroke. Verdict: yes"


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


def _cached_answers(ctx: RunContext) -> list[str]:
    path = ctx.cache_dir / "responses.sqlite"
    if not path.exists():
        return []
    with ResponseCache(path) as cache:
        return [row[0] for row in cache._conn().execute("SELECT answer FROM responses")]


def _closed_port_url() -> str:
    """The URL of a loopback port nothing listens on (a connection to it is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


# -- plugin surface -----------------------------------------------------------------------------


@pytest.mark.parametrize(("role", "cls"), [("critic", OpenAICritic), ("judge", OpenAIJudge)])
def test_registered_with_documented_options(role, cls):
    assert get_registry().get(role, "openai") is cls
    for name, field in cls.Options.model_fields.items():
        assert field.description, f"{cls.__name__}.Options.{name} lacks a description"
    with pytest.raises(ValueError):
        cls.Options(no_such_option=1)
    assert not OpenAICritic.needs_true_masks
    assert OpenAIJudge.Options().model == "gpt-4o-mini" and OpenAICritic.Options().model == "gpt-4o"


@pytest.mark.parametrize("cls", [OpenAICritic, OpenAIJudge])
@pytest.mark.parametrize(
    "value",
    [
        "sk-proj-4f9a2cDOnotLEAK",
        "sk_live_4f9a2cDOnotLEAK",
        "abcdef0123456789abcdef0123",  # a token's shape: long, lowercase and digits, no "_"
        "MY-KEY",
        "2FA_TOKEN",
        "OPENAI_API_KEY ",
    ],
)
def test_key_like_api_key_env_is_refused_without_echoing_it(cls, value):
    with pytest.raises(ValidationError) as info:
        cls.Options(api_key_env=value)
    [error] = info.value.errors()
    assert error["loc"] == ("api_key_env",)
    assert value.strip() not in error["msg"] and value.strip() not in str(info.value)


@pytest.mark.parametrize(
    "value", ["", "OPENAI_API_KEY", "_MY_KEY_2", "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123", "a_b"]
)
def test_variable_names_are_accepted_as_api_key_env(value):
    assert OpenAICritic.Options(api_key_env=value).api_key_env == value


@pytest.mark.parametrize(
    "value",
    [
        "http://user:s3cretpw@127.0.0.1:8000/v1",
        "https://proxy.example/v1?api_key=s3cretpw",
        "https://proxy.example/v1?x=1&Access-Token=s3cretpw",
        "https://proxy.example/v1?auth=s3cretpw",
        "s3cretpw",  # a key pasted where the URL goes
    ],
)
def test_base_url_with_credentials_is_refused_without_echoing_it(value):
    with pytest.raises(ValidationError) as info:
        OpenAIJudge.Options(base_url=value)
    [error] = info.value.errors()
    assert error["loc"] == ("base_url",)
    assert "s3cretpw" not in error["msg"] and "s3cretpw" not in str(info.value)


def test_plain_base_urls_are_accepted_and_secret_fields_marked_for_redaction():
    for url in ["http://127.0.0.1:8000/v1", "https://x.example/openai/v1?api-version=2024-06-01"]:
        assert OpenAICritic.Options(base_url=url).base_url == url
    for cls in (OpenAICritic, OpenAIJudge):
        for name in ("api_key_env", "base_url"):
            assert cls.Options.model_fields[name].json_schema_extra["redact_errors"] is True


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


def test_the_body_a_batch_line_would_hold_is_what_the_server_receives(ctx):
    with ScriptedOpenAIServer(answer=_blue_is_spurious) as server:
        critic = _critic(server, extra_body={"top_k": 5})
        judge = _judge(server, extra_body={"top_k": 5})
        [request] = synthetic_requests(1, COLORS)
        [critique] = critic.critique([request], ctx)
        judge.judge([critique], ctx)
        for plugin, item, received in [(critic, request, server.requests[0]), (judge, critique, server.requests[1])]:
            [job] = plugin._jobs([item], ctx, plugin.transport(ctx), None)
            assert plugin.transport(ctx).body(job.chat) == received.body


def test_seed_can_be_left_out(ctx):
    with ScriptedOpenAIServer(answer=WHOLE) as server:
        _critic(server, send_seed=False).critique(synthetic_requests(1, COLORS), ctx)
        assert "seed" not in server.requests[0].body


def test_transient_errors_are_retried_honouring_retry_after(ctx):
    with ScriptedOpenAIServer(
        answer=WHOLE, faults=["429", "500", "truncate", None], retry_after_s=0.3
    ) as server:
        start = time.perf_counter()
        critic = _critic(server, backoff_initial_s=0.0, backoff_max_s=5.0)
        out = critic.critique(synthetic_requests(1, COLORS), ctx)
        elapsed = time.perf_counter() - start
        assert server.count == 4
    assert out[0].text == WHOLE and out[0].usage.requests == 4
    assert elapsed >= 0.3  # the 429's Retry-After was waited out even with zero backoff
    line = _transcripts(ctx)[0]
    assert line["attempts"] == 4 and len(line["errors"]) == 3
    assert "HTTP 429" in line["errors"][0] and "HTTP 500" in line["errors"][1]
    assert "unreadable" in line["errors"][2]


def test_retry_after_is_capped_by_backoff_max(ctx):
    with ScriptedOpenAIServer(
        answer=WHOLE, faults=["429", "429", None], retry_after_s=30
    ) as server:
        start = time.perf_counter()
        out = _critic(server, backoff_max_s=0.1).critique(synthetic_requests(1, COLORS), ctx)
        elapsed = time.perf_counter() - start
        assert server.count == 3
    assert out[0].text == WHOLE
    assert elapsed < 10  # two waits of at most 0.1 s, not of 30 s


def test_timeout_is_retried(ctx):
    with ScriptedOpenAIServer(
        answer=WHOLE, faults=["delay", None], fault_delay_s=1.0
    ) as server:
        out = _critic(server, timeout_s=0.3).critique(synthetic_requests(1, COLORS), ctx)
    assert out[0].text == WHOLE
    assert "timed out" in _transcripts(ctx)[0]["errors"][0]


def test_exhausted_attempts_become_a_failure_not_an_exception(ctx):
    requests = synthetic_requests(2, COLORS)
    with ScriptedOpenAIServer(answer=WHOLE, faults=fault_when("digit 0", "500")) as server:
        out = _critic(server, max_attempts=3).critique(requests, ctx)
        assert server.count == 4
        assert out[0].text is None and out[0].failure == f"HTTP 500 at {server.base_url}"
    assert out[0].retryable and out[0].usage.requests == 3
    assert out[1].text == WHOLE and not out[1].retryable
    # The attempts and each one's error stay in the transcript.
    line = next(line for line in _transcripts(ctx) if line["sample_id"] == 0)
    assert line["attempts"] == 3 and len(line["errors"]) == 3 and line["retryable"] is True
    assert line["errors"][0].startswith("attempt 1: HTTP 500: internal error")


@pytest.mark.parametrize(
    ("fault", "cause"),
    [
        ("503", "HTTP 503"),
        ("429", "HTTP 429 (rate limited)"),
        ("delay", "timed out after 0.2 s"),
        ("truncate", "unreadable response body"),
        ("disconnect", "connection error (Server disconnected without sending a response.)"),
    ],
)
def test_transport_failures_name_the_cause_and_the_server_alike_for_every_sample(ctx, fault, cause):
    requests = synthetic_requests(3, COLORS)
    with ScriptedOpenAIServer(
        answer=_blue_is_spurious, faults=lambda i, body: fault, fault_delay_s=0.6, retry_after_s=0
    ) as server:
        critic = _critic(server, max_attempts=2, timeout_s=0.2, backoff_initial_s=0.0)
        out = critic.critique(requests, ctx)
        verdicts = _judge(server, max_attempts=2, timeout_s=0.2, backoff_initial_s=0.0).judge(
            [_critique(i) for i in range(3)], ctx
        )
        url = server.base_url
    assert {c.failure for c in out} == {f"{cause} at {url}"}
    assert {v.failure for v in verdicts} == {f"{cause} at {url}"}
    assert all(c.retryable and c.text is None for c in out)
    assert all(v.retryable and v.relevant is None for v in verdicts)
    assert _cached_answers(ctx) == []


def test_refused_connection_is_named_with_the_address(ctx):
    url = _closed_port_url()
    options = dict(FAST, base_url=url, max_attempts=2, backoff_initial_s=0.0)
    out = OpenAICritic(OpenAICritic.Options(**options)).critique(synthetic_requests(2, COLORS), ctx)
    assert [c.failure for c in out] == [f"connection refused at {url}"] * 2
    assert all(c.retryable for c in out)
    errors = _transcripts(ctx)[0]["errors"]
    assert len(errors) == 2 and errors[0].startswith("attempt 1: connection error: ")
    verdicts = OpenAIJudge(OpenAIJudge.Options(**options)).judge([_critique()], ctx)
    assert verdicts[0].failure == f"connection refused at {url}" and verdicts[0].retryable


def test_the_address_comes_from_the_environment_without_credentials(ctx, monkeypatch):
    url = _closed_port_url()
    host_and_path = url.removeprefix("http://")
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://user:pa55word@{host_and_path}?api_key=zz9")
    critic = OpenAICritic(OpenAICritic.Options(**{**FAST, "max_attempts": 1}))
    [out] = critic.critique(synthetic_requests(1, COLORS), ctx)
    assert out.failure == f"connection refused at {url}"
    monkeypatch.delenv("OPENAI_BASE_URL")
    assert critic._address == "https://api.openai.com/v1"


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("401", "Incorrect API key provided (scripted)"),
        ("403", "Project does not have access to this model (scripted)"),
        ("404", "The model does not exist (scripted)"),
    ],
)
def test_client_errors_are_not_retried_and_ask_again_next_run(ctx, fault, message):
    with ScriptedOpenAIServer(faults=[fault, None]) as server:
        out = _critic(server).critique(synthetic_requests(1, COLORS), ctx)
        assert server.count == 1
        assert out[0].failure == f"HTTP {fault}: {message} at {server.base_url}"
    # Not an answer about the sample but a setting to fix: a re-run asks again.
    assert out[0].retryable and _cached_answers(ctx) == []


def test_a_bad_request_names_the_server_message(ctx):
    with ScriptedOpenAIServer(faults=["400", None]) as server:
        out = _critic(server).critique(synthetic_requests(1, COLORS), ctx)
        assert server.count == 1
        assert out[0].failure.startswith("HTTP 400: bad request (scripted)")
        assert out[0].failure.endswith(f" at {server.base_url}") and out[0].retryable


class _PageServer:
    """A server (a proxy's sign-in page, a gateway's error page) that answers every request with
    HTTP 200 and ``body`` of ``content_type``, until ``heal()``: then with ``answer``."""

    def __init__(self, body: bytes, content_type: str, answer: str = WHOLE) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        outer = self
        self.count, self.healed = 0, False

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):  # noqa: N802 - http.server's name
                outer.count += 1
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                data, kind = body, content_type
                if outer.healed:
                    kind = "application/json"
                    data = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                                       "choices": [{"index": 0, "finish_reason": "stop",
                                                    "message": {"role": "assistant", "content": answer}}],
                                       "usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode()  # fmt: skip
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


PAGE = b"<!DOCTYPE html>\n<html><head><title>Gateway sign-in</title></head><body>Please sign in</body></html>"


@pytest.mark.parametrize(
    ("body", "content_type", "said"),
    [
        (PAGE, "text/html; charset=utf-8", "unreadable response: HTTP 200 text/html, not JSON: "
         "'<!DOCTYPE html> <html><head><title>Gateway sign-in</title></head><body>Please sign in</body></html>'"),
        (b'{"detail": "upstream unavailable"}', "application/json",
         "unreadable response: HTTP 200 application/json, JSON that is not a chat completion: "
         "'{\"detail\": \"upstream unavailable\"}'"),
    ],
)
def test_a_body_that_is_not_a_chat_completion_is_a_retryable_failure_that_says_what_came_back(ctx, body, content_type, said):
    server = _PageServer(body, content_type)
    try:
        critic = _critic(server, max_attempts=2, backoff_initial_s=0.0)
        [out] = critic.critique(synthetic_requests(1, COLORS), ctx)
        assert server.count == 2  # retried like any transient failure
        assert out.failure == f"{said} at {server.base_url}" and out.retryable and out.text is None
        assert _cached_answers(ctx) == []
        line = _transcripts(ctx)[0]
        assert line["errors"] == [f"attempt 1: {said}", f"attempt 2: {said}"]
        [judged] = _judge(server, max_attempts=1).judge([_critique()], ctx)
        assert judged.failure == f"{said} at {server.base_url}" and judged.retryable
        server.healed = True  # a new run asks again and gets the answer
        [again] = critic.critique(synthetic_requests(1, COLORS), ctx)
        assert again.text == WHOLE and server.count == 4
    finally:
        server.close()


def test_the_scripted_servers_html_fault_is_retried_and_named(ctx):
    requests = synthetic_requests(2, COLORS)
    with ScriptedOpenAIServer(answer=_blue_is_spurious, faults=["html", None, None]) as server:
        critiques = _critic(server, max_attempts=2, backoff_initial_s=0.0, concurrency=1).critique(requests, ctx)
        assert server.count == 3 and all(c.text is not None for c in critiques)  # retried, answered
    errors = [e for line in _transcripts(ctx) for e in line["errors"]]
    assert len(errors) == 1 and errors[0].startswith(
        "attempt 1: unreadable response: HTTP 200 text/html, not JSON: '<!DOCTYPE html> <html><head><title>Sign in</title>"
    )
    with ScriptedOpenAIServer(faults=fault_when("digit 1", "html")) as server:
        out = _critic(server, max_attempts=2, backoff_initial_s=0.0).critique(synthetic_requests(3, COLORS, seed=5), ctx)
        url = server.base_url
    assert out[1].retryable and out[1].failure.startswith("unreadable response: HTTP 200 text/html, not JSON: ")
    assert out[1].failure.endswith(f" at {url}") and "Sign in" in out[1].failure
    assert out[0].failure is None and out[2].failure is None


def _unusable(ctx: RunContext) -> list[str]:
    """The unusable answers stored in the response cache (never read as answers)."""
    path = ctx.cache_dir / "responses.sqlite"
    with ResponseCache(path) as cache:
        return [row[0] for row in cache._conn().execute("SELECT answer FROM unusable ORDER BY rowid")]


def test_empty_answer_is_stored_as_unusable_and_asked_again_at_most_max_invalid_attempts(ctx):
    with ScriptedOpenAIServer(answer="") as server:
        critic = _critic(server)
        [out] = critic.critique(synthetic_requests(1, COLORS), ctx)
        assert out.failure == (
            "critic returned an empty answer (finish_reason=stop) (unusable answer 1 of "
            "critic.max_invalid_attempts = 2: a new run asks again)"
        )
        assert out.retryable and out.text is None  # the stage is left unfinished: asked again
        [again] = critic.critique(synthetic_requests(1, COLORS), ctx)
        assert server.count == 2
        assert not again.retryable and again.failure.endswith(
            "(2 unusable answers, critic.max_invalid_attempts = 2: not asked again; "
            "lvlmva compose --retry-invalid asks once more)"
        )
        [spent] = critic.critique(synthetic_requests(1, COLORS), ctx)
        assert server.count == 2  # not asked a third time
        assert spent.failure == again.failure and not spent.retryable and spent.usage.requests == 0
        assert _cached_answers(ctx) == [] and _unusable(ctx) == ["", ""]
        [retried] = _critic(server, retry_invalid=True).critique(synthetic_requests(1, COLORS), ctx)
        assert server.count == 3 and retried.failure.startswith("critic returned an empty answer")
    lines = _transcripts(ctx)
    assert [line["asked"] for line in lines] == ["missing", "invalid so far", None, "retry-invalid"]
    assert [line["unusable_answers"] for line in lines] == [1, 2, 2, 3]


def test_an_answer_cut_off_or_not_discussing_every_colour_is_never_used_or_cached(ctx):
    requests = synthetic_requests(4, COLORS)
    answers = {"digit 2": "", "digit 3": "Sure! Here is my analysis of the image you sent."}
    with ScriptedOpenAIServer(
        answer=lambda body: next((a for k, a in answers.items() if k in json.dumps(body)), WHOLE),
        faults=fault_when("digit 1", "length"),
    ) as server:
        out = _critic(server, max_tokens=50, max_invalid_attempts=1).critique(requests, ctx)
        assert out[0].text == WHOLE
        spent = (
            " (1 unusable answers, critic.max_invalid_attempts = 1: not asked again; "
            "lvlmva compose --retry-invalid asks once more)"
        )
        assert out[1].failure == f"critic answer cut off at max_tokens = 50; raise critic.max_tokens{spent}"
        assert out[2].failure.startswith("critic returned an empty answer")
        assert out[3].failure == f"critic answer discusses none of the cluster colours (red, blue, green){spent}"
        assert not any(c.retryable for c in out)
        assert _cached_answers(ctx) == [WHOLE]
        assert sorted(_unusable(ctx)) == sorted(["", answers["digit 3"], WHOLE[: len(WHOLE) // 2]])
        _critic(server, max_tokens=50, max_invalid_attempts=1).critique(requests, ctx)
        assert server.count == 4  # the unusable answers were not asked for again
        _critic(server, max_tokens=50, max_invalid_attempts=2).critique(requests, ctx)
        assert server.count == 7  # a larger bound asks them once more
    line = next(line for line in _transcripts(ctx) if line["sample_id"] == 1)
    assert line["finish_reason"] == "length" and line["answer"]


def test_concurrency_is_bounded_and_used(ctx):
    with ScriptedOpenAIServer(answer=WHOLE, latency_s=0.2) as server:
        start = time.perf_counter()
        _critic(server, concurrency=4).critique(synthetic_requests(8, COLORS), ctx)
        elapsed = time.perf_counter() - start
        assert server.max_in_flight == 4
    assert elapsed < 0.4 * 1.5 + 0.5  # two waves of 0.2 s, not eight


def test_runs_inside_a_running_event_loop(ctx):
    with ScriptedOpenAIServer(answer=WHOLE) as server:
        critic = _critic(server)

        async def notebook_cell():
            return critic.critique(synthetic_requests(1, COLORS), ctx)

        assert asyncio.run(notebook_cell())[0].text == WHOLE


def test_missing_key_variable_fails_before_any_request(ctx, monkeypatch):
    monkeypatch.delenv("LVLMVA_TEST_ABSENT_KEY", raising=False)
    with ScriptedOpenAIServer() as server:
        critic = _critic(server, api_key_env="LVLMVA_TEST_ABSENT_KEY")
        with pytest.raises(RuntimeError, match="LVLMVA_TEST_ABSENT_KEY"):
            critic.critique(synthetic_requests(1, COLORS), ctx)
        assert server.count == 0


# -- preflight ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("role", "cls"), [("critic", OpenAICritic), ("judge", OpenAIJudge)])
def test_preflight_names_an_unset_key_variable_never_a_value(monkeypatch, role, cls):
    plugin = cls(cls.Options(api_key_env="LVLMVA_TEST_PREFLIGHT_KEY"))
    monkeypatch.delenv("LVLMVA_TEST_PREFLIGHT_KEY", raising=False)
    [problem] = plugin.preflight(8)
    assert problem.startswith(
        f"{role} 'openai': the environment variable LVLMVA_TEST_PREFLIGHT_KEY"
    )
    assert f"{role}.api_key_env" in problem
    monkeypatch.setenv("LVLMVA_TEST_PREFLIGHT_KEY", "")
    assert len(plugin.preflight(8)) == 1
    monkeypatch.setenv("LVLMVA_TEST_PREFLIGHT_KEY", "sk-present-DO-NOT-LEAK")
    assert plugin.preflight(8) == []
    assert cls(cls.Options(api_key_env="")).preflight(8) == []


def test_preflight_request_limits():
    critic = OpenAICritic(OpenAICritic.Options(api_key_env="", max_requests=10))
    assert critic.preflight(64) == [
        "critic 'openai': this run may send up to 64 requests (64 alignment samples), "
        "more than critic.max_requests = 10"
    ]
    assert critic.preflight(10) == []
    judge = OpenAIJudge(OpenAIJudge.Options(api_key_env="", max_requests=100, repair_attempts=1))
    assert judge.preflight(64) == [
        "judge 'openai': this run may send up to 128 requests (64 alignment samples, up to 2 "
        "answers each with repair_attempts = 1), more than judge.max_requests = 100"
    ]
    assert judge.preflight(50) == []


def _template_file(tmp_path, role: str, chars: int) -> str:
    """A template whose prompt text (with the judge's user message) has ``chars`` characters."""
    if role == "critic":
        head, user = "<label> <class_description> <num_clusters> <cluster_colors> ", ""
    else:
        head, user = "<num_clusters> <cluster_colors> ", "<critique>"
    text = head + "x" * (chars - len(head) - len(user))
    path = tmp_path / f"{role}.toml"
    path.write_text(f'version = "1"\ntext = "{text}"\nuser = "{user or "<critique>"}"\n')
    return str(path)


def test_preflight_cost_estimate_from_template_images_and_prices(tmp_path):
    prices = {"priced": {"prompt_per_1k": 1.0, "completion_per_1k": 2.0}}
    common = dict(api_key_env="", model="priced", prices=prices, max_tokens=100)
    critic_options = OpenAICritic.Options(
        **common, template=_template_file(tmp_path, "critic", 400), image_detail="low"
    )
    # 400 characters = 100 tokens, three images at 85: 355 prompt and 100 completion tokens, a
    # request costs 0.355 + 0.2 USD.
    estimate = estimate_spending("critic", critic_options, 2)
    assert (estimate.requests, estimate.prompt_tokens, estimate.completion_tokens) == (2, 355, 100)
    assert estimate.cost_usd == pytest.approx(2 * 0.555)
    detailed = critic_options.model_copy(update={"image_detail": "auto"})
    assert estimate_spending("critic", detailed, 2).prompt_tokens == 100 + 3 * 255
    over = OpenAICritic(critic_options.model_copy(update={"max_cost_usd": 1.0}))
    assert over.preflight(2) == [
        "critic 'openai': estimated cost up to $1.11 (2 requests of priced, about 355 prompt and "
        "100 completion tokens each), more than critic.max_cost_usd = 1"
    ]
    assert over.preflight(1) == []

    # The judge: its template, the critique bounded by max_tokens, and the repair rounds.
    judge_options = OpenAIJudge.Options(
        **common, template=_template_file(tmp_path, "judge", 200), repair_attempts=2
    )
    estimate = estimate_spending("judge", judge_options, 4)
    assert (estimate.requests, estimate.prompt_tokens) == (12, 50 + 100)
    assert estimate.cost_usd == pytest.approx(12 * (0.150 + 0.2))
    judge = OpenAIJudge(judge_options.model_copy(update={"max_cost_usd": 4.0}))
    assert judge.preflight(4)[0].startswith("judge 'openai': estimated cost up to $4.20 ")


def test_preflight_cost_limit_needs_a_price_and_a_loadable_template(tmp_path):
    critic = OpenAICritic(OpenAICritic.Options(api_key_env="", model="local-vlm", max_cost_usd=1))
    [problem] = critic.preflight(4)
    assert "no price for model 'local-vlm'" in problem and "critic.prices" in problem
    assert OpenAICritic(OpenAICritic.Options(api_key_env="", model="local-vlm")).preflight(4) == []
    missing = OpenAIJudge(OpenAIJudge.Options(api_key_env="", template=str(tmp_path / "no.toml")))
    [problem] = missing.preflight(4)
    assert problem.startswith("judge 'openai': ") and "no such judge template file" in problem


def test_preflight_estimate_of_the_built_in_templates_bounds_a_real_run():
    """The estimate is an upper bound: the prompt a built-in template really gives is shorter."""
    options = OpenAICritic.Options(api_key_env="", model="gpt-4o")
    estimate = estimate_spending("critic", options, 1)
    longest = max(
        len(render_critic_prompt(load_template(f, "critic"), r))
        for f in ("decoy-mnist", "knee", "skin")
        for r in synthetic_requests(1, ("red", "blue", "green", "yellow", "pink"), family=f)
    )
    assert longest // 4 + 3 * 255 <= estimate.prompt_tokens
    assert 0 < estimate.cost_usd < 0.05


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
    assert _cached_answers(ctx) == [VALID]  # the repaired answer only, under the first key
    assert second[2] == {"role": "assistant", "content": "The red one is fine, blue is not."}
    assert second[3]["role"] == "user" and "no JSON object" in second[3]["content"]
    assert "red, blue, green" in second[3]["content"]
    line = _transcripts(ctx)[0]
    assert (
        line["verdicts"] == {"red": "yes", "blue": "no", "green": "yes"}
        and len(line["validation_errors"]) == 1
    )


def test_judge_stores_an_answer_invalid_after_repair_as_unusable_and_stops_asking(ctx):
    bad = json.dumps(
        {"output": [{"color": "red", "verdict": "yes"}, {"color": "blue", "verdict": "no"}]}
    )
    with ScriptedOpenAIServer(answer=bad) as server:
        judge = _judge(server)
        out = judge.judge([_critique()], ctx)
        assert out[0].relevant is None and out[0].attempts == 2
        assert out[0].failure.startswith('invalid judge answer after 2 answer(s): invalid answer: missing colour(s) "green"')
        assert out[0].retryable  # 1 of max_invalid_attempts = 2: a new run asks again
        assert server.count == 2
        [again] = judge.judge([_critique()], ctx)
        assert server.count == 4 and not again.retryable
        [spent] = judge.judge([_critique()], ctx)
        assert server.count == 4  # max_invalid_attempts reached: not asked again
        assert spent.failure.startswith('invalid judge answer: invalid answer: missing colour(s) "green"')
        assert spent.failure.endswith("judge.max_invalid_attempts = 2: not asked again; lvlmva compose --retry-invalid asks once more)")
    assert len(ResponseCache(ctx.cache_dir / "responses.sqlite")) == 0
    assert _unusable(ctx) == [bad, bad]


def test_judge_answer_cut_off_says_to_raise_max_tokens(ctx):
    with ScriptedOpenAIServer(answer=VALID, faults=lambda i, body: "length") as server:
        [out] = _judge(server, max_tokens=20, max_invalid_attempts=1).judge([_critique()], ctx)
        assert server.count == 2
    assert out.failure.startswith("invalid judge answer after 2 answer(s): ")
    assert "cut off at max_tokens = 20; raise judge.max_tokens) (1 unusable answers" in out.failure
    assert not out.retryable and _cached_answers(ctx) == []


def test_judge_request_failing_during_repair_is_retryable(ctx):
    with ScriptedOpenAIServer(answer="no JSON here", faults=[None, "401"]) as server:
        [out] = _judge(server).judge([_critique()], ctx)
        assert (
            out.failure == f"HTTP 401: Incorrect API key provided (scripted) at {server.base_url}"
        )
    assert out.retryable and out.relevant is None and _cached_answers(ctx) == []


def test_judge_sets_extra_colours_aside_also_when_read_from_the_cache(ctx):
    items = [{"color": "pink", "verdict": "yes"}] + json.loads(VALID)["output"]
    answer = json.dumps({"output": items})
    with ScriptedOpenAIServer(answer=answer) as server:
        [first] = _judge(server).judge([_critique()], ctx)
        [again] = _judge(server).judge([_critique()], ctx)
        assert server.count == 1
    assert first.relevant == EXPECTED and first.ignored_colors == ("pink",) and first.attempts == 1
    assert again.relevant == EXPECTED and again.ignored_colors == ("pink",)
    assert again.usage.cache_hits == 1
    assert [line["ignored_colors"] for line in _transcripts(ctx)] == [["pink"], ["pink"]]


def test_failed_critique_is_a_failed_verdict_without_requests(ctx):
    failed = Critique(
        2, COLORS, None, failure="HTTP 500 at http://x/v1", family="decoy-mnist", retryable=True
    )
    with ScriptedOpenAIServer(answer=VALID) as server:
        out = _judge(server).judge([failed, _critique(3)], ctx)
        assert server.count == 1
    assert (
        out[0].relevant is None
        and out[0].failure == "no critique to judge: HTTP 500 at http://x/v1"
    )
    assert not out[0].retryable  # asking the judge again cannot help
    assert out[1].relevant == EXPECTED


# -- cache, usage, transcripts ------------------------------------------------------------------


def test_second_run_is_served_from_cache_across_servers(ctx, tmp_path):
    requests = synthetic_requests(4, COLORS)
    with ScriptedOpenAIServer(answer=_blue_is_spurious) as first:
        critiques = _critic(first).critique(requests, ctx)
        verdicts = _judge(first).judge(critiques, ctx)
        # the four critiques read alike: one judge request answers them all
        assert len({c.text for c in critiques}) == 1 and first.count == 4 + 1
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
    with ScriptedOpenAIServer(answer=WHOLE) as server:
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
    assert leaked_reason and "[redacted]" in leaked_reason[0]  # the server echoed it; redacted
    assert all(secret not in (v.failure or "") for v in verdicts)
    captured = capfd.readouterr()
    assert secret not in captured.out + captured.err + caplog.text
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "responses.sqlite" for p in files) and any(
        p.name == "transcripts.jsonl" for p in files
    )
    for path in files:
        assert secret.encode() not in path.read_bytes(), path


# -- keys read with whitespace, and failures that quote a key -------------------------------------

KEY_VAR = "LVLMVA_TEST_CRLF_KEY"


def _forms_of(key: str) -> list[str]:
    """How a key shows up in a text: as read, stripped, and as repr, bytes repr and JSON write
    it (the stripped key is part of every one of them)."""
    return [key, key.strip(), repr(key)[1:-1], repr(key.encode())[2:-1], json.dumps(key)[1:-1]]


def _assert_nowhere(key: str, texts: list[str], root) -> None:
    for text in texts:
        assert key.strip() not in text, text
    for path in (p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for form in _forms_of(key):
            assert form.encode() not in data, (path, form)


@pytest.mark.parametrize("key", ["sk-test-123\r\n", "sk-test-123\n", " sk-test-123\t"])
def test_a_key_read_with_a_line_ending_is_stripped_and_works(ctx, monkeypatch, tmp_path, key):
    monkeypatch.setenv(KEY_VAR, key)
    with ScriptedOpenAIServer(answer=_blue_is_spurious) as server:
        critic = _critic(server, api_key_env=KEY_VAR)
        judge = _judge(server, api_key_env=KEY_VAR)
        assert critic.preflight(2) == [] and judge.preflight(2) == []
        critiques = critic.critique(synthetic_requests(2, COLORS), ctx)
        verdicts = judge.judge(critiques, ctx)
        # two critic requests, one judge request for the two critiques that read alike
        assert [r.headers["authorization"] for r in server.requests] == ["Bearer sk-test-123"] * 3
    assert all(c.failure is None for c in critiques)
    assert [v.relevant for v in verdicts] == [EXPECTED] * 2
    _assert_nowhere(key, [], tmp_path)


@pytest.mark.parametrize(
    "key",
    [
        "sk-test 123",
        "sk-test-123\r\nsk-second-456",
        "sk-test-\x1b123",
        "sk-tëst-123",
        "sk-test\t123",
    ],
)
@pytest.mark.parametrize(("role", "cls"), [("critic", OpenAICritic), ("judge", OpenAIJudge)])
def test_a_key_with_inner_whitespace_or_control_characters_is_refused_naming_the_variable(
    ctx, monkeypatch, role, cls, key
):
    monkeypatch.setenv(KEY_VAR, key)
    with ScriptedOpenAIServer(answer=_blue_is_spurious) as server:
        plugin = cls(cls.Options(base_url=server.base_url, **{**FAST, "api_key_env": KEY_VAR}))
        [problem] = plugin.preflight(2)
        assert problem.startswith(f"{role} 'openai': the environment variable {KEY_VAR} ")
        assert f"{role}.api_key_env" in problem and "inside the key" in problem
        with pytest.raises(RuntimeError, match=KEY_VAR) as info:
            if role == "critic":
                plugin.critique(synthetic_requests(1, COLORS), ctx)
            else:
                plugin.judge([_critique()], ctx)
        assert server.count == 0  # refused before any request
    for text in (problem, str(info.value)):
        assert "sk-" not in text and "123" not in text, text


def test_an_empty_or_blank_key_is_refused_as_unset(monkeypatch):
    plugin = OpenAICritic(OpenAICritic.Options(api_key_env=KEY_VAR))
    for blank in ("", "\r\n", "  "):
        monkeypatch.setenv(KEY_VAR, blank)
        [problem] = plugin.preflight(2)
        assert (
            f"the environment variable {KEY_VAR} named by critic.api_key_env is not set or empty"
            in problem
        )


def _client_that(monkeypatch, fail):
    """Make every request of the backend fail with ``fail(key)``, raised by the client."""
    from lvlmva.plugins.lvlm.openai_transport import OpenAITransport

    real = OpenAITransport._client

    def client(self):
        made = real(self)

        async def create(**_kwargs):
            raise fail(os.environ[KEY_VAR])

        made.chat.completions.with_raw_response.create = create
        return made

    monkeypatch.setattr(OpenAITransport, "_client", client)


def test_an_http_library_error_quoting_the_key_is_redacted(ctx, monkeypatch, tmp_path):
    """The HTTP library refuses a header with a line break and quotes it, escaped, in its error
    (forced here by giving the client the key as read, unstripped)."""
    key = "sk-test-forced-7f3e\r\n"
    monkeypatch.setenv(KEY_VAR, key)
    from lvlmva.plugins.lvlm.openai_transport import OpenAITransport

    real = OpenAITransport._client

    def unstripped(self):
        self._key = os.environ[KEY_VAR]
        return real(self)

    monkeypatch.setattr(OpenAITransport, "_client", unstripped)
    with ScriptedOpenAIServer(answer=VALID) as server:
        critiques = _critic(server, api_key_env=KEY_VAR).critique(
            synthetic_requests(2, COLORS), ctx
        )
        verdicts = _judge(server, api_key_env=KEY_VAR).judge([_critique(5), *critiques], ctx)
        assert server.count == 0
    failures = [c.failure for c in critiques] + [v.failure for v in verdicts]
    assert all(f and "Illegal header value" in f and "[redacted]" in f for f in failures[:3]), (
        failures
    )
    lines = _transcripts(ctx)
    assert len(lines) == 5 and all("[redacted]" in json.dumps(line) for line in lines)
    _assert_nowhere(
        key, [*failures, *(e for line in lines for e in line.get("errors", []))], tmp_path
    )


def test_a_caught_failure_quoting_the_key_raw_and_escaped_is_redacted(ctx, monkeypatch, tmp_path):
    key = "sk-test-forced-7f3e\r\n"
    monkeypatch.setenv(KEY_VAR, key)
    # a body the client cannot read, its error quoting the key as it is and as repr writes it
    _client_that(monkeypatch, lambda k: ValueError(f"bad body near {k} ({k!r}, {k.encode()!r})"))
    with ScriptedOpenAIServer(answer=VALID) as server:
        [critique] = _critic(server, api_key_env=KEY_VAR, max_attempts=2).critique(
            synthetic_requests(1, COLORS), ctx
        )
        [verdict] = _judge(server, api_key_env=KEY_VAR, max_attempts=2).judge([_critique()], ctx)
        url = server.base_url
    assert critique.failure == verdict.failure == f"unreadable response body at {url}"
    errors = [e for line in _transcripts(ctx) for e in line["errors"]]
    assert len(errors) == 4
    assert all(e.endswith("bad body near [redacted] ('[redacted]', b'[redacted]')") for e in errors)
    _assert_nowhere(key, errors, tmp_path)


@pytest.mark.parametrize("role", ["critic", "judge"])
def test_an_exception_quoting_the_key_is_raised_redacted_without_its_chain(
    ctx, monkeypatch, tmp_path, role
):
    key = "sk-test-forced-7f3e\n"
    monkeypatch.setenv(KEY_VAR, key)

    def fail(k: str) -> Exception:
        try:
            raise OSError(f"socket said {k!r}")
        except OSError as inner:
            error = KeyError(f"no route for {k}")
            error.__cause__ = inner
            return error

    _client_that(monkeypatch, fail)
    with ScriptedOpenAIServer(answer=VALID) as server:
        with pytest.raises(RuntimeError) as info:
            if role == "critic":
                _critic(server, api_key_env=KEY_VAR).critique(synthetic_requests(1, COLORS), ctx)
            else:
                _judge(server, api_key_env=KEY_VAR).judge([_critique()], ctx)
    raised = info.value
    assert str(raised).startswith(f"{role} plugin 'openai': KeyError: ")
    assert "no route for [redacted]" in str(raised) and "OSError: socket said '[redacted]'" in str(
        raised
    )
    assert raised.__cause__ is None and raised.__context__ is None
    shown = "".join(__import__("traceback").format_exception(raised))
    _assert_nowhere(key, [str(raised), repr(raised), shown], tmp_path)


def test_exceptions_without_a_secret_are_raised_as_they_are(ctx, monkeypatch):
    monkeypatch.setenv(KEY_VAR, "sk-test-forced-7f3e")
    _client_that(monkeypatch, lambda k: KeyError("no route"))
    with ScriptedOpenAIServer(answer=VALID) as server:
        with pytest.raises(KeyError, match="no route"):
            _critic(server, api_key_env=KEY_VAR).critique(synthetic_requests(1, COLORS), ctx)


def test_judges_redact_a_critic_failure_that_quotes_a_key(ctx, monkeypatch, tmp_path):
    """A critic's failure that quotes a registered key is judged by any judge without it."""
    from lvlmva.plugins.judges.rules import RulesJudge
    from lvlmva.plugins.lvlm.transformers_backend import TransformersJudge

    key = "sk-test-forced-7f3e\r\n"
    monkeypatch.setenv(KEY_VAR, key)
    OpenAICritic(OpenAICritic.Options(api_key_env=KEY_VAR)).preflight(1)  # reads, registers
    failed = Critique(
        1, COLORS, None, failure=f"Illegal header value {b'Bearer ' + key.encode()!r}",
        family="decoy-mnist", retryable=True,
    )  # fmt: skip
    judges = [
        OpenAIJudge(OpenAIJudge.Options(**FAST)),
        RulesJudge(RulesJudge.Options()),
        TransformersJudge(TransformersJudge.Options(model="no-model-is-loaded")),
    ]
    failures = [judge.judge([failed], ctx)[0].failure for judge in judges]
    assert all("Illegal header value b'Bearer [redacted]'" in f for f in failures), failures
    assert len(_transcripts(ctx)) == 2  # the two LVLM judges write one line each
    _assert_nowhere(key, failures, tmp_path)
