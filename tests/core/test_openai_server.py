"""The scripted OpenAI-compatible test server: answers, faults, counts, determinism, and the
files and batches routes driven by the official ``openai`` client and by raw HTTP."""

from __future__ import annotations

import http.client
import io
import json
import threading
import time
from collections import Counter

import openai
import pytest
from openai.types.chat import ChatCompletion

from lvlmva.plugins.lvlm.prompts import load_template, render_critic_prompt
from lvlmva.testing.openai_server import (
    API_FAULT_KINDS,
    BATCH_TERMINAL_STATUSES,
    FAULT_KINDS,
    RANDOM_FAULT_KINDS,
    SCRIPTED_FAULT_KINDS,
    BatchOutcome,
    ScriptedOpenAIServer,
    colors_in_prompt,
    critic_answer,
    fault_when,
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


# -- html fault -------------------------------------------------------------------------------


def _client(server: ScriptedOpenAIServer, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="test-key", max_retries=0, **kwargs)


def test_html_fault_raw_and_through_the_openai_client():
    with ScriptedOpenAIServer(answer="fine", faults=fault_when("proxy", "html")) as server:
        status, headers, data = _post(server, _chat("behind the proxy"))
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert data.startswith(b"<!DOCTYPE html>") and b"<html>" in data
        with pytest.raises(json.JSONDecodeError):
            json.loads(data)
        assert _post(server, _chat("direct"))[0] == 200
        messages = [{"role": "user", "content": "behind the proxy"}]
        # The default client does not raise: create() returns the page as a str, not a
        # ChatCompletion (it parses only JSON Content-Types and falls back to the text).
        page = _client(server).chat.completions.create(model="m", messages=messages)
        assert isinstance(page, str) and page.startswith("<!DOCTYPE html>")
        # The raw response shows the status and Content-Type to check.
        raw = _client(server).chat.completions.with_raw_response.create(
            model="m", messages=messages
        )
        assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/html")
        # With strict response validation the client raises instead.
        strict = _client(server, _strict_response_validation=True)
        with pytest.raises(openai.APIResponseValidationError) as caught:
            strict.chat.completions.create(model="m", messages=messages)
        assert caught.value.status_code == 200 and "text/html" in str(caught.value)
        assert isinstance(caught.value, openai.APIError)
        assert server.count == 5 and server.fault_counts() == {"html": 4}
        assert server.answered == 1  # an HTML page is not an answer
    assert "html" in SCRIPTED_FAULT_KINDS and "html" not in RANDOM_FAULT_KINDS


# -- files ------------------------------------------------------------------------------------


def _batch_lines(n: int, model: str = "m", prefix: str = "question") -> list[dict]:
    return [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"{prefix} {i}"}]},
        }
        for i in range(n)
    ]


def _jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def _request(
    server: ScriptedOpenAIServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict | None = None,
    **kwargs,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request(method, path, body=body, headers=headers or {}, **kwargs)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def _multipart(fields: list[tuple[str, str | None, bytes]], boundary: str = "b0und4ry") -> bytes:
    out = b""
    for name, filename, value in fields:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if filename is not None:
            out += b"Content-Type: application/jsonl\r\n"
        out += b"\r\n" + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def test_upload_retrieve_and_content_with_the_openai_client(tmp_path):
    content = _jsonl(_batch_lines(2))
    with ScriptedOpenAIServer() as server:
        client = _client(server)
        uploaded = client.files.create(file=("input.jsonl", content), purpose="batch")
        assert uploaded.object == "file" and uploaded.id.startswith("file-")
        assert (uploaded.filename, uploaded.purpose, uploaded.bytes) == (
            "input.jsonl",
            "batch",
            len(content),
        )
        assert uploaded.expires_at == uploaded.created_at + 30 * 86400
        path = tmp_path / "from_disk.jsonl"
        path.write_bytes(content + b"\n")
        from_disk = client.files.create(file=path, purpose="batch")
        with path.open("rb") as handle:
            from_handle = client.files.create(file=handle, purpose="user_data")
        assert client.files.retrieve(uploaded.id) == uploaded
        assert client.files.content(uploaded.id).content == content
        assert client.files.content(from_disk.id).content == content + b"\n"
        assert from_handle.purpose == "user_data" and from_handle.filename == "from_disk.jsonl"
        assert [f.id for f in client.files.list(purpose="batch")] == [from_disk.id, uploaded.id]
        assert server.files_uploaded == 3
        assert [(u.file_id, u.filename, u.purpose) for u in server.uploads] == [
            (uploaded.id, "input.jsonl", "batch"),
            (from_disk.id, "from_disk.jsonl", "batch"),
            (from_handle.id, "from_disk.jsonl", "user_data"),
        ]
        assert server.uploads[0].content == content
        assert server.uploads[0].headers["authorization"] == "Bearer test-key"
        assert server.count == 0 and server.batches_created == 0
        with pytest.raises(openai.NotFoundError, match="No such File object: file-nope"):
            client.files.retrieve("file-nope")
        with pytest.raises(openai.NotFoundError):
            client.files.content("file-nope")
        # OpenAI takes only .jsonl files for batches (an unnamed BytesIO is sent as "upload")
        with pytest.raises(openai.BadRequestError, match="Must be .jsonl"):
            client.files.create(file=io.BytesIO(content), purpose="batch")
        assert client.files.delete(from_handle.id).deleted is True
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(from_handle.id)
        assert server.files_uploaded == 3  # the rejected upload is not counted


def test_upload_by_raw_multipart_and_chunked_body():
    content = _jsonl(_batch_lines(1))
    body = _multipart([("purpose", None, b"batch"), ("file", "raw.jsonl", content)])
    multipart = {"Content-Type": "multipart/form-data; boundary=b0und4ry"}
    with ScriptedOpenAIServer() as server:
        status, headers, data = _request(server, "POST", "/v1/files", body, multipart)
        assert status == 200 and headers["content-type"] == "application/json"
        first = json.loads(data)
        assert (first["filename"], first["purpose"], first["bytes"]) == (
            "raw.jsonl",
            "batch",
            len(content),
        )
        # the same body sent with chunked transfer encoding
        status, _, data = _request(
            server, "POST", "/v1/files", iter([body[:50], body[50:]]), multipart,
            encode_chunked=True,
        )  # fmt: skip
        assert status == 200
        second = json.loads(data)
        status, headers, data = _request(server, "GET", f"/v1/files/{second['id']}/content")
        assert status == 200 and data == content
        assert headers["content-type"] == "application/octet-stream"
        rejected = [
            (_multipart([("file", "raw.jsonl", content)]), "'purpose'"),
            (_multipart([("purpose", None, b"batch")]), "'file'"),
            (_multipart([("purpose", None, b"homework"), ("file", "a.jsonl", b"")]), "purpose"),
            (_multipart([("purpose", None, b"batch")])[:-12], "multipart"),
        ]
        for bad, reason in rejected:
            status, _, data = _request(server, "POST", "/v1/files", bad, multipart)
            assert status == 400 and reason in json.loads(data)["error"]["message"]
        status, _, _ = _request(
            server, "POST", "/v1/files", b"{}", {"Content-Type": "application/json"}
        )
        assert status == 400
        assert server.files_uploaded == 2
        assert [(c.method, c.path, c.status) for c in server.api_calls][:3] == [
            ("POST", "/v1/files", 200),
            ("POST", "/v1/files", 200),
            ("GET", f"/v1/files/{second['id']}/content", 200),
        ]


# -- batches ----------------------------------------------------------------------------------


def _wait_terminal(client: openai.OpenAI, batch_id: str, timeout: float = 10.0) -> list:
    """Poll with the client until the batch ends; every Batch object seen, in order."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.append(client.batches.retrieve(batch_id))
        if seen[-1].status in BATCH_TERMINAL_STATUSES:
            return seen
        time.sleep(0.02)
    raise AssertionError(f"batch {batch_id} did not end: {seen[-1].status}")


def _file_lines(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_batch_progresses_through_its_statuses_with_the_delay():
    delay = 0.4
    with ScriptedOpenAIServer(
        answer=lambda body: body["messages"][0]["content"].upper(), batch_delay_s=delay
    ) as server:
        client = _client(server)
        uploaded = client.files.create(file=("in.jsonl", _jsonl(_batch_lines(6))), purpose="batch")
        start = time.monotonic()
        batch = client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"run": "test"},
        )
        assert batch.status == "validating" and batch.object == "batch"
        assert batch.request_counts.total == 0 and batch.output_file_id is None
        assert batch.expires_at == batch.created_at + 86400
        assert batch.metadata == {"run": "test"}
        seen = _wait_terminal(client, batch.id)
        elapsed = time.monotonic() - start
        statuses = [b.status for b in seen]
        order = ["validating", "in_progress", "finalizing", "completed"]
        assert sorted(set(statuses), key=order.index) == order  # each one seen
        assert statuses == sorted(statuses, key=order.index)  # never back
        assert elapsed >= 3 * delay
        in_progress = [b.request_counts.completed for b in seen if b.status == "in_progress"]
        assert in_progress == sorted(in_progress) and in_progress[0] < 6  # grows while running
        done = seen[-1]
        assert done.request_counts.model_dump() == {"total": 6, "completed": 6, "failed": 0}
        assert done.in_progress_at and done.finalizing_at and done.completed_at
        assert done.error_file_id is None and done.errors is None and done.model == "m"
        assert done.usage.total_tokens > 0
        output = _file_lines(client, done.output_file_id)
        assert [line["custom_id"] for line in output] == [f"req-{i}" for i in range(6)]
        for i, line in enumerate(output):
            assert line["error"] is None and line["id"].startswith("batch_req_")
            assert line["response"]["status_code"] == 200
            assert line["response"]["request_id"].startswith("req_")
            completion = ChatCompletion.model_validate(line["response"]["body"])
            assert completion.choices[0].message.content == f"QUESTION {i}"
        output_file = client.files.retrieve(done.output_file_id)
        assert output_file.purpose == "batch_output"
        # the counters: one upload, one batch, six lines, no synchronous request
        assert (server.files_uploaded, server.batches_created, server.batch_line_count) == (1, 1, 6)
        assert server.count == 0 and server.answered == 0 and server.requests == []
        assert server.batch_creates[0].body["input_file_id"] == uploaded.id
        assert server.batch_creates[0].batch_id == batch.id
        assert [r.custom_id for r in server.batch_lines] == [f"req-{i}" for i in range(6)]
        assert {r.batch_id for r in server.batch_lines} == {batch.id}
        assert server.batch_lines[0].headers["authorization"] == "Bearer test-key"
        # a synchronous request next to it is counted apart
        _post(server, _chat("alone"))
        assert server.count == 1 and server.batch_line_count == 6


def test_batch_by_raw_http():
    with ScriptedOpenAIServer(answer="ok") as server:
        body = _multipart(
            [("purpose", None, b"batch"), ("file", "in.jsonl", _jsonl(_batch_lines(2)))]
        )
        _, _, data = _request(
            server, "POST", "/v1/files", body,
            {"Content-Type": "multipart/form-data; boundary=b0und4ry"},
        )  # fmt: skip
        file_id = json.loads(data)["id"]
        create = {"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                  "completion_window": "24h"}  # fmt: skip
        status, _, data = _request(
            server, "POST", "/v1/batches", json.dumps(create).encode(),
            {"Content-Type": "application/json"},
        )  # fmt: skip
        assert status == 200 and json.loads(data)["status"] == "validating"
        batch_id = json.loads(data)["id"]
        assert server.wait_for_batch(batch_id)["status"] == "completed"
        status, _, data = _request(server, "GET", f"/v1/batches/{batch_id}")
        batch = json.loads(data)
        assert status == 200 and batch["request_counts"] == {
            "total": 2,
            "completed": 2,
            "failed": 0,
        }
        _, _, data = _request(server, "GET", f"/v1/files/{batch['output_file_id']}/content")
        assert [json.loads(x)["custom_id"] for x in data.splitlines()] == ["req-0", "req-1"]
        assert server.file_content(batch["output_file_id"]) == data
        assert _request(server, "GET", "/v1/batches/batch_nope")[0] == 404
        assert _request(server, "POST", "/v1/batches/batch_nope/cancel")[0] == 404
        assert _request(server, "POST", "/v1/batches", b"not json")[0] == 400


def test_failed_lines_go_to_the_error_file():
    script = {"question 1": "500", "question 2": "429", "question 3": "prose",
              "question 4": "length", "question 5": "400", "question 6": "html"}  # fmt: skip

    def faults(index: int, body: dict) -> str | None:
        return script.get(body["messages"][0]["content"])

    with ScriptedOpenAIServer(answer='{"ok": 1}', batch_faults=faults) as server:
        client = _client(server)
        uploaded = client.files.create(file=("in.jsonl", _jsonl(_batch_lines(8))), purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        done = _wait_terminal(client, batch.id)[-1]
        assert done.status == "completed"
        assert done.request_counts.model_dump() == {"total": 8, "completed": 4, "failed": 4}
        output = {line["custom_id"]: line for line in _file_lines(client, done.output_file_id)}
        errors = {line["custom_id"]: line for line in _file_lines(client, done.error_file_id)}
        assert sorted(output) == ["req-0", "req-3", "req-4", "req-7"]
        assert {cid: line["response"]["status_code"] for cid, line in errors.items()} == {
            "req-1": 500, "req-2": 429, "req-5": 400, "req-6": 500,
        }  # fmt: skip
        assert all(line["error"] is None for line in errors.values())
        assert errors["req-2"]["response"]["body"]["error"]["code"] == "rate_limit_exceeded"
        # the 400 echoes the key of the request that created the batch, as the synchronous one
        assert "test-key" in errors["req-5"]["response"]["body"]["error"]["message"]
        prose = output["req-3"]["response"]["body"]["choices"][0]
        cut = output["req-4"]["response"]["body"]["choices"][0]
        assert not prose["message"]["content"].startswith("{")
        assert cut["finish_reason"] == "length" and cut["message"]["content"] == '{"ok'
        assert [r.fault for r in server.batch_lines] == [
            None, "500", "429", "prose", "length", "400", "html", None,
        ]  # fmt: skip
        assert server.fault_counts() == {}  # synchronous requests only


def test_faults_script_indexes_batch_lines_apart_from_requests():
    with ScriptedOpenAIServer(answer="ok", faults=[None, "503"]) as server:
        client = _client(server)
        uploaded = client.files.create(file=("in.jsonl", _jsonl(_batch_lines(3))), purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        done = server.wait_for_batch(batch.id)
        errors = _file_lines(client, done["error_file_id"])
        assert [(e["custom_id"], e["response"]["status_code"]) for e in errors] == [("req-1", 503)]
        # the synchronous requests count from 0 on their own
        assert _post(server, _chat("a"))[0] == 200
        assert _post(server, _chat("b"))[0] == 503


def test_expired_batch_puts_the_lines_not_done_in_the_error_file():
    with ScriptedOpenAIServer(
        answer="ok", batch_outcomes=[BatchOutcome.expire(after=2), None]
    ) as server:
        client = _client(server)
        uploaded = client.files.create(file=("in.jsonl", _jsonl(_batch_lines(5))), purpose="batch")

        def run() -> openai.types.Batch:
            batch = client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            return _wait_terminal(client, batch.id)[-1]

        expired = run()
        assert expired.status == "expired" and expired.expired_at is not None
        assert expired.completed_at is None and expired.finalizing_at is None
        assert expired.request_counts.model_dump() == {"total": 5, "completed": 2, "failed": 0}
        output = _file_lines(client, expired.output_file_id)
        errors = _file_lines(client, expired.error_file_id)
        assert [line["custom_id"] for line in output] == ["req-0", "req-1"]
        assert [line["custom_id"] for line in errors] == ["req-2", "req-3", "req-4"]
        for line in errors:
            assert line["response"] is None
            assert line["error"] == {
                "code": "batch_expired",
                "message": "This request could not be executed before the completion window "
                "expired.",
            }
        assert server.batch_line_count == 2  # the expired lines never ran
        again = run()  # the resubmitted batch completes
        assert again.status == "completed" and again.error_file_id is None
        assert len(_file_lines(client, again.output_file_id)) == 5
        assert (server.batches_created, server.batch_line_count) == (2, 7)


def test_batch_failing_validation():
    def outcomes(index: int, lines: list[dict]) -> BatchOutcome | None:
        assert [line["custom_id"] for line in lines] == ["req-0", "req-1"]
        return BatchOutcome.fail("Too many tokens (scripted).", code="token_limit_exceeded")

    with ScriptedOpenAIServer(answer="ok", batch_outcomes=outcomes) as server:
        client = _client(server)
        good = client.files.create(file=("in.jsonl", _jsonl(_batch_lines(2))), purpose="batch")
        failed = server.wait_for_batch(
            client.batches.create(
                input_file_id=good.id, endpoint="/v1/chat/completions", completion_window="24h"
            ).id
        )
        batch = client.batches.retrieve(failed["id"])
        assert batch.status == "failed" and batch.failed_at is not None
        assert batch.output_file_id is None and batch.error_file_id is None
        assert batch.request_counts.total == 0 and batch.in_progress_at is None
        assert batch.errors.object == "list"
        assert [(e.code, e.message) for e in batch.errors.data] == [
            ("token_limit_exceeded", "Too many tokens (scripted).")
        ]
        assert server.batch_line_count == 0

    lines = _batch_lines(4)
    lines[1]["custom_id"] = "req-0"  # a duplicate
    lines[2]["url"] = "/v1/embeddings"
    lines[3]["body"]["model"] = "other"
    content = _jsonl(lines) + b"{not json\n"
    with ScriptedOpenAIServer(answer="ok") as server:
        client = _client(server)
        bad = client.files.create(file=("in.jsonl", content), purpose="batch")
        empty = client.files.create(file=("empty.jsonl", b"\n"), purpose="batch")
        for file_id, expected in (
            (bad.id, [("duplicate_custom_id", 2), ("invalid_url", 3), ("mismatched_model", 4),
                      ("invalid_json_line", 5)]),
            (empty.id, [("empty_file", None)]),
        ):  # fmt: skip
            batch = client.batches.create(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            done = server.wait_for_batch(batch.id)
            assert done["status"] == "failed"
            assert [(e["code"], e["line"]) for e in done["errors"]["data"]] == expected
        assert server.batch_line_count == 0


def test_batch_create_rejects_bad_parameters():
    with ScriptedOpenAIServer() as server:
        client = _client(server)
        uploaded = client.files.create(file=("in.jsonl", _jsonl(_batch_lines(1))), purpose="batch")
        other = client.files.create(file=("in.jsonl", _jsonl(_batch_lines(1))), purpose="user_data")
        good = {"input_file_id": uploaded.id, "endpoint": "/v1/chat/completions",
                "completion_window": "24h"}  # fmt: skip
        for change, error in (
            ({"endpoint": "/v1/embeddings"}, openai.BadRequestError),
            ({"completion_window": "1h"}, openai.BadRequestError),
            ({"metadata": {"k": 1}}, openai.BadRequestError),
            ({"input_file_id": other.id}, openai.BadRequestError),
            ({"input_file_id": "file-nope"}, openai.NotFoundError),
        ):
            with pytest.raises(error):
                client.batches.create(**{**good, **change})
        status, _, data = _request(
            server, "POST", "/v1/batches", json.dumps({"endpoint": "/v1/chat/completions"}),
            {"Content-Type": "application/json"},
        )  # fmt: skip
        assert status == 400 and json.loads(data)["error"]["param"] == "input_file_id"
        assert server.batches_created == 0


def test_cancel_keeps_the_lines_done():
    release = threading.Event()

    def answer(body: dict) -> str:
        if body["messages"][0]["content"] == "question 3":
            release.wait(10)  # the line in flight when the cancel arrives
        return "ok"

    with ScriptedOpenAIServer(answer=answer, batch_delay_s=0.1) as server:
        client = _client(server)
        uploaded = client.files.create(file=("in.jsonl", _jsonl(_batch_lines(8))), purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        deadline = time.monotonic() + 10
        while server.batch_line_count < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        cancelling = client.batches.cancel(batch.id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
        assert client.batches.cancel(batch.id).status == "cancelling"  # again: no change
        release.set()
        seen = _wait_terminal(client, batch.id)
        done = seen[-1]
        assert {b.status for b in seen} <= {"cancelling", "cancelled"}
        assert done.status == "cancelled" and done.cancelled_at is not None
        assert done.request_counts.model_dump() == {"total": 8, "completed": 4, "failed": 0}
        output = _file_lines(client, done.output_file_id)
        assert [line["custom_id"] for line in output] == ["req-0", "req-1", "req-2", "req-3"]
        assert done.error_file_id is None  # lines never run are in neither file
        assert server.batch_line_count == 4
        with pytest.raises(openai.ConflictError, match="Cannot cancel a batch with status"):
            client.batches.cancel(batch.id)

        # cancelled while validating: nothing runs
        early = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert client.batches.cancel(early.id).status == "cancelling"
        done = _wait_terminal(client, early.id)[-1]
        assert done.status == "cancelled" and done.output_file_id is None
        assert done.request_counts.total == 0 and server.batch_line_count == 4


def test_list_batches_newest_first_with_pages():
    with ScriptedOpenAIServer(answer="ok") as server:
        client = _client(server)
        uploaded = client.files.create(file=("in.jsonl", _jsonl(_batch_lines(1))), purpose="batch")
        ids = [
            client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            ).id
            for _ in range(3)
        ]
        page = client.batches.list(limit=2)
        assert [b.id for b in page.data] == ids[:0:-1] and page.has_more is True
        assert [b.id for b in client.batches.list(limit=2)] == ids[::-1]  # follows the pages
        _, _, data = _request(server, "GET", f"/v1/batches?limit=5&after={ids[1]}")
        listed = json.loads(data)
        assert [b["id"] for b in listed["data"]] == [ids[0]] and listed["has_more"] is False
        assert listed["object"] == "list" and listed["first_id"] == listed["last_id"] == ids[0]
        assert server.batches_created == 3


def test_shuffled_output_keeps_every_custom_id():
    with ScriptedOpenAIServer(answer="ok", shuffle_batch_output=True) as server:
        client = _client(server)
        uploaded = client.files.create(file=("in.jsonl", _jsonl(_batch_lines(20))), purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        done = server.wait_for_batch(batch.id)
        order = [line["custom_id"] for line in _file_lines(client, done["output_file_id"])]
        expected = [f"req-{i}" for i in range(20)]
        assert sorted(order) == sorted(expected) and order != expected


def test_api_faults_on_files_and_batches_routes():
    script = ["500", "html", "disconnect", "truncate", None]
    with ScriptedOpenAIServer(answer="ok", api_faults=script, retry_after_s=0) as server:
        client = _client(server)
        with pytest.raises(openai.InternalServerError):
            client.batches.retrieve("batch_any")
        page = client.batches.retrieve("batch_any")  # the HTML page comes back as a str
        assert isinstance(page, str) and page.startswith("<!DOCTYPE html>")
        with pytest.raises(openai.APIConnectionError):
            client.batches.list()
        status, _, data = _request(server, "GET", "/v1/batches")
        assert status == 200
        with pytest.raises(json.JSONDecodeError):
            json.loads(data)
        assert json.loads(_request(server, "GET", "/v1/batches")[2])["data"] == []
        assert [(c.path, c.fault, c.status) for c in server.api_calls] == [
            ("/v1/batches/batch_any", "500", 500),
            ("/v1/batches/batch_any", "html", 200),
            ("/v1/batches", "disconnect", None),
            ("/v1/batches", "truncate", 200),
            ("/v1/batches", None, 200),
        ]
        assert server.count == 0  # the API calls are not chat requests

    def fail_polls(index: int, method: str, path: str) -> str | None:
        return "503" if method == "GET" and path.startswith("/v1/batches/") else None

    with ScriptedOpenAIServer(answer="ok", api_faults=fail_polls) as server:
        client = _client(server)
        uploaded = client.files.create(file=("in.jsonl", _jsonl(_batch_lines(1))), purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        with pytest.raises(openai.InternalServerError) as caught:
            client.batches.retrieve(batch.id)
        assert caught.value.status_code == 503
        assert server.wait_for_batch(batch.id)["status"] == "completed"  # it ran regardless


def test_reset_and_bad_batch_arguments():
    with pytest.raises(ValueError, match="unknown batch outcome"):
        BatchOutcome("explode")
    with pytest.raises(ValueError, match="unknown batch outcome"):
        ScriptedOpenAIServer(batch_outcomes=["complete", "explode"])
    with pytest.raises(ValueError, match="unknown api fault kinds"):
        ScriptedOpenAIServer(api_faults=["prose"])
    with pytest.raises(ValueError, match="batch_delay_s"):
        ScriptedOpenAIServer(batch_delay_s=-1)
    assert "prose" not in API_FAULT_KINDS and "html" in API_FAULT_KINDS
    with ScriptedOpenAIServer(answer="ok") as server:
        client = _client(server)
        uploaded = client.files.create(file=("in.jsonl", _jsonl(_batch_lines(2))), purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        server.wait_for_batch(batch.id)
        _post(server, _chat("a"))
        server.reset()
        assert (server.count, server.batch_line_count, server.batches_created) == (0, 0, 0)
        assert server.files_uploaded == 0 and server.api_calls == []
        assert client.batches.retrieve(batch.id).status == "completed"  # stored objects stay
        assert server.batch(batch.id)["request_counts"]["completed"] == 2
