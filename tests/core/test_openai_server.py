"""The scripted OpenAI-compatible test server: answers, faults, counts, determinism."""

from __future__ import annotations

import http.client
import json
import time
from collections import Counter

import pytest

from lvlmva.plugins.lvlm.prompts import load_template, render_critic_prompt
from lvlmva.testing.openai_server import (
    FAULT_KINDS,
    ScriptedOpenAIServer,
    colors_in_prompt,
    critic_answer,
    judge_answer_from_critique,
    synthetic_requests,
)


def _post(
    server: ScriptedOpenAIServer, body: dict, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps(body),
        headers={"Content-Type": "application/json", "Authorization": "Bearer secret-abc"},
    )
    response = conn.getresponse()
    data = response.read()
    headers = {k.lower(): v for k, v in response.getheaders()}
    conn.close()
    return response.status, headers, data


def _chat(text: str) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": text}]}


def test_scripted_answers_usage_and_records():
    with ScriptedOpenAIServer(answer=["first", "second"]) as server:
        assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
        answers = []
        for i in range(3):
            status, _, data = _post(server, _chat(f"question number {i}"))
            assert status == 200
            payload = json.loads(data)
            answers.append(payload["choices"][0]["message"]["content"])
            # the documented rough count: 17 prompt characters // 4, answer length // 4 (min 1)
            assert payload["usage"] == {
                "prompt_tokens": 4,
                "completion_tokens": 1,
                "total_tokens": 5,
            }
        assert answers == ["first", "second", "second"]
        assert server.count == 3 and server.answered == 3
        assert [r.body["messages"][0]["content"] for r in server.requests] == [
            f"question number {i}" for i in range(3)
        ]
        assert server.requests[0].headers["authorization"] == "Bearer secret-abc"


def test_callable_answer_sees_the_request():
    with ScriptedOpenAIServer(answer=lambda body: body["messages"][0]["content"].upper()) as server:
        _, _, data = _post(server, _chat("echo me"))
    assert json.loads(data)["choices"][0]["message"]["content"] == "ECHO ME"


def test_each_fault_kind():
    script = ["429", "500", "truncate", "prose", "400", "delay", None]
    with ScriptedOpenAIServer(
        answer='{"ok": 1}', faults=script, retry_after_s=0.25, fault_delay_s=0.3
    ) as server:
        status, headers, _ = _post(server, _chat("a"))
        assert (
            status == 429
            and headers["retry-after"] == "0.25"
            and headers["retry-after-ms"] == "250"
        )
        assert _post(server, _chat("a"))[0] == 500
        status, _, data = _post(server, _chat("a"))
        assert status == 200
        with pytest.raises(json.JSONDecodeError):
            json.loads(data)
        _, _, data = _post(server, _chat("a"))
        assert not json.loads(data)["choices"][0]["message"]["content"].startswith("{")
        status, _, data = _post(server, _chat("a"))
        assert status == 400 and b"secret-abc" in data  # the leak clients must redact
        start = time.perf_counter()
        assert _post(server, _chat("a"))[0] == 200
        assert time.perf_counter() - start >= 0.3
        assert (
            json.loads(_post(server, _chat("a"))[2])["choices"][0]["message"]["content"]
            == '{"ok": 1}'
        )
        assert server.fault_counts() == {k: 1 for k in FAULT_KINDS}
        assert server.answered == 3  # prose, delay and the normal answer


def test_seeded_fault_rate_is_deterministic_and_near_the_rate():
    def run(seed: int) -> list[str | None]:
        with ScriptedOpenAIServer(
            answer="x", fault_rate=0.3, seed=seed, retry_after_s=0, fault_delay_s=0
        ) as s:
            for i in range(200):
                _post(s, _chat(f"question {i}"))
            return [r.fault for r in s.requests]

    first, again, other = run(1), run(1), run(2)
    assert first == again and first != other
    # Pinned from one run: seed 1 draws 53 faults in 200 requests, about one standard deviation
    # (6.5) below the 60 that rate 0.3 expects, spread over every random fault kind.
    kinds = Counter(f for f in first if f is not None)
    assert kinds == {"429": 12, "500": 8, "delay": 13, "truncate": 10, "prose": 10}


def test_bad_arguments_and_routes():
    with pytest.raises(ValueError, match="unknown fault kinds"):
        ScriptedOpenAIServer(fault_kinds=["teapot"])
    with pytest.raises(ValueError, match="fault_rate"):
        ScriptedOpenAIServer(fault_rate=1.5)
    with ScriptedOpenAIServer() as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        conn.request("POST", "/v1/embeddings", body="{}", headers={"Content-Length": "2"})
        assert conn.getresponse().status == 404
        conn.close()


def test_default_answerer_pairs_critic_and_judge():
    request = synthetic_requests(1, colors=("red", "blue", "green"))[0]
    prompt = render_critic_prompt(load_template("decoy-mnist", "critic"), request)
    # The few-shot example in the prompt names other colours; the listed set is found anyway.
    assert colors_in_prompt(prompt) == ["red", "blue", "green"]
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": prompt},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            }
        ]
    }
    critique = critic_answer(body, verdict=lambda digest, color: color != "blue")
    assert critique.count("Verdict:") == 3 and "Blue: The cluster covers a corner" in critique
    judge_body = {
        "messages": [{"role": "system", "content": "x"}, {"role": "user", "content": critique}]
    }
    assert json.loads(judge_answer_from_critique(judge_body)) == {
        "output": [
            {"color": "red", "verdict": "yes"},
            {"color": "blue", "verdict": "no"},
            {"color": "green", "verdict": "yes"},
        ]
    }


def test_synthetic_requests_are_distinct_pngs():
    requests = synthetic_requests(3, colors=("red", "blue"))
    assert [r.sample_id for r in requests] == [0, 1, 2]
    assert all(r.rendered.original.startswith(b"\x89PNG") for r in requests)
    assert len({r.rendered.original for r in requests}) == 3
    assert requests[1].rendered.files[0] == "render/sample_1_original.png"
