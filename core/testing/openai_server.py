"""A local OpenAI-compatible chat-completions server for tests and benchmarks.

It plays scripted answers and injects the faults a real deployment shows: 429 with
``Retry-After``, 500, answers delayed past the client's timeout, truncated bodies, and prose
where JSON was asked for; by script also 401, 403, 404, 503, dropped connections and answers
cut off at ``max_tokens``. It counts and records every request, so a test can assert how many
calls a run made.

    with ScriptedOpenAIServer(latency_s=0.5) as server:
        critic = OpenAICritic(OpenAICritic.Options(base_url=server.base_url, ...))

The default answerer acts as a well-behaved LVLM pair: a critic request (one with images) gets
one paragraph per cluster colour ending in ``Verdict: yes|no`` (chosen from the image hashes, so
the same images always get the same verdicts), a judge request gets the JSON that matches the
critique it carries. Pass ``answer=`` to script anything else.

Standard library only (``http.server``), loopback only, one thread per connection.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = [
    "FAULT_KINDS",
    "RANDOM_FAULT_KINDS",
    "SCRIPTED_FAULT_KINDS",
    "fault_when",
    "ScriptedOpenAIServer",
    "RecordedRequest",
    "default_answer",
    "critic_answer",
    "judge_answer_from_critique",
    "colors_in_prompt",
    "synthetic_requests",
    "data_url_bytes",
]

#: the faults the server can inject ("400" is a non-retryable error whose message echoes the
#: request's Authorization header, as careless servers do: clients must not log it verbatim)
FAULT_KINDS = ("429", "500", "delay", "truncate", "prose", "400")

#: the faults drawn at random by default (the transient ones and a wrong answer)
RANDOM_FAULT_KINDS = ("429", "500", "delay", "truncate", "prose")

#: further faults for ``faults=`` scripts: other HTTP errors, "disconnect" (the connection is
#: closed without a response), and "length", an answer cut to its first half with
#: ``finish_reason = "length"`` (as when ``max_tokens`` runs out)
SCRIPTED_FAULT_KINDS = ("401", "403", "404", "503", "disconnect", "length")

_ALL_FAULT_KINDS = FAULT_KINDS + SCRIPTED_FAULT_KINDS

#: status, message and error code of the plain HTTP-error faults
_ERROR_FAULTS = {
    "401": (401, "Incorrect API key provided (scripted)", "invalid_api_key"),
    "403": (403, "Project does not have access to this model (scripted)", "forbidden"),
    "404": (404, "The model does not exist (scripted)", "model_not_found"),
    "500": (500, "internal error (scripted)", "server_error"),
    "503": (503, "service unavailable (scripted)", "server_error"),
}

#: colour names the default answerer recognises in prompts (a superset of the default palette)
KNOWN_COLORS = (
    "red", "blue", "green", "yellow", "pink", "brown", "grey", "orange", "purple",
    "cyan", "magenta", "black", "white", "olive", "navy", "teal",
)  # fmt: skip

Answerer = Callable[[dict[str, Any]], str]
FaultScript = Callable[[int, dict[str, Any]], "str | None"]


def fault_when(text: str, kind: str) -> FaultScript:
    """A ``faults=`` script that gives ``kind`` to every request whose JSON body contains
    ``text`` (a prompt phrase, a colour), on every attempt: a persistent failure of chosen
    samples while the others are answered."""
    if kind not in _ALL_FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(_ALL_FAULT_KINDS)}")
    return lambda index, body: kind if text in json.dumps(body) else None


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server received: its JSON body, headers, and what it did with it."""

    index: int
    body: dict[str, Any]
    headers: dict[str, str]
    fault: str | None
    received: float


# -- default answerer -------------------------------------------------------------------------


def _message_texts(message: dict[str, Any]) -> list[str]:
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [part.get("text", "") for part in content if part.get("type") == "text"]
    return []


def _image_urls(body: dict[str, Any]) -> list[str]:
    urls = []
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if part.get("type") == "image_url":
                    urls.append(part["image_url"]["url"])
    return urls


def colors_in_prompt(text: str) -> list[str]:
    """The cluster colours a prompt lists: the longest comma-separated run of colour names
    (``"red, blue, green"``); the first such run when several are equally long."""
    names = "|".join(KNOWN_COLORS)
    runs = re.findall(rf"\b(?:{names})(?:, (?:{names}))*\b", text)
    best: list[str] = []
    for run in runs:
        colors = run.split(", ")
        if len(colors) > len(best):
            best = colors
    return best


def critic_answer(body: dict[str, Any], verdict: Callable[[str, str], bool] | None = None) -> str:
    """A critic answer for the colours in the prompt: one paragraph per colour ending in
    ``Verdict: yes|no``. ``verdict(image_digest, color)`` decides; by default a hash of the
    images and the colour does (about one cluster in three is "no")."""
    text = "\n".join(t for m in body.get("messages", []) for t in _message_texts(m))
    digest = hashlib.sha256("".join(_image_urls(body)).encode()).hexdigest()
    colors = colors_in_prompt(text)
    if not colors:
        return "I cannot find any cluster colours in the question."
    if verdict is None:

        def verdict(d: str, c: str) -> bool:
            return int(hashlib.sha256(f"{d}:{c}".encode()).hexdigest()[:8], 16) % 3 != 0

    paragraphs = []
    for color in colors:
        relevant = verdict(digest, color)
        where = (
            "lies on the strokes of the digit"
            if relevant
            else "covers a corner away from the digit"
        )
        paragraphs.append(
            f"{color.capitalize()}: The cluster {where}.\nVerdict: {'yes' if relevant else 'no'}"
        )
    return "\n\n".join(paragraphs)


_VERDICT_LINE = re.compile(
    r"^\W*(?P<color>[A-Za-z]+)\W*:.*?verdict\W*:?\s*(?P<v>yes|no)\b", re.IGNORECASE | re.DOTALL
)


def judge_answer_from_critique(body: dict[str, Any]) -> str:
    """A judge answer: JSON with one item per ``Color: ... Verdict: yes|no`` paragraph of the
    critique carried in the first user message."""
    users = [m for m in body.get("messages", []) if m.get("role") == "user"]
    critique = "\n".join(_message_texts(users[0])) if users else ""
    items = []
    for paragraph in re.split(r"\n\s*\n", critique):
        match = _VERDICT_LINE.search(paragraph.strip())
        if match and match.group("color").lower() in KNOWN_COLORS:
            items.append(
                {"color": match.group("color").lower(), "verdict": match.group("v").lower()}
            )
    return json.dumps({"output": items})


def default_answer(body: dict[str, Any]) -> str:
    """Critic answer for requests with images, judge answer otherwise."""
    return critic_answer(body) if _image_urls(body) else judge_answer_from_critique(body)


# -- server -----------------------------------------------------------------------------------


class ScriptedOpenAIServer:
    """OpenAI-compatible ``POST /v1/chat/completions`` on ``127.0.0.1`` (a free port).

    - ``answer``: ``callable(request_json) -> text``, a sequence of texts played in order (the
      last one repeats), a single text, or ``None`` for :func:`default_answer`.
    - ``latency_s``: fixed delay before every answer.
    - ``fault_rate`` / ``fault_kinds`` / ``seed``: inject a fault into that share of requests.
      The choice is a hash of the seed, the request body and how often that body was seen, so
      it does not depend on the order in which concurrent requests arrive; a repeated request
      draws again (a retry can succeed).
    - ``faults``: an explicit script instead, ``callable(index, request_json) -> kind | None``
      (:func:`fault_when` makes one) or a sequence of kinds (``None`` = answer normally)
      indexed by request number; scripts may also use :data:`SCRIPTED_FAULT_KINDS`.
    - ``retry_after_s``: the ``Retry-After`` a 429 carries; ``fault_delay_s``: how long a
      ``"delay"`` fault stalls (set it past the client's timeout).
    - ``port``: the loopback port to bind (0: a free one); a test can stop a server and start
      another at the same address, as a local server that comes up again.
    """

    def __init__(
        self,
        answer: Answerer | Sequence[str] | str | None = None,
        *,
        latency_s: float = 0.0,
        fault_rate: float = 0.0,
        fault_kinds: Sequence[str] = RANDOM_FAULT_KINDS,
        faults: FaultScript | Sequence[str | None] | None = None,
        seed: int = 0,
        retry_after_s: float = 0.05,
        fault_delay_s: float = 2.0,
        port: int = 0,
    ) -> None:
        unknown = [k for k in fault_kinds if k not in _ALL_FAULT_KINDS]
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; known: {', '.join(_ALL_FAULT_KINDS)}")
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be in [0, 1], got {fault_rate}")
        self._answer = answer
        self._script_index = 0
        self.latency_s = float(latency_s)
        self.fault_rate = float(fault_rate)
        self.fault_kinds = tuple(fault_kinds)
        self.faults = faults
        self.seed = int(seed)
        self.retry_after_s = float(retry_after_s)
        self.fault_delay_s = float(fault_delay_s)
        self._port = int(port)
        self.requests: list[RecordedRequest] = []
        self.answered = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._seen: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.on_answer: Callable[[int], None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> ScriptedOpenAIServer:
        """Bind to a free loopback port and serve in a daemon thread."""
        if self._httpd is not None:
            raise RuntimeError("server already started")
        handler = type("_Handler", (_Handler,), {"server_ref": self})
        server_cls = type("_Server", (ThreadingHTTPServer,), {"request_queue_size": 256})
        # A deep listen backlog: the default of 5 drops bursts of concurrent connects.
        server_cls.allow_reuse_address = True
        self._httpd = server_cls(("127.0.0.1", self._port), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="openai-test-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and free the port."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> ScriptedOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """What a client's ``base_url`` should be: ``http://127.0.0.1:PORT/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    # -- counts ------------------------------------------------------------------------------
    @property
    def count(self) -> int:
        """Chat-completion requests received (faulted ones included)."""
        with self._lock:
            return len(self.requests)

    def fault_counts(self) -> Counter[str]:
        """How many requests got each fault."""
        with self._lock:
            return Counter(r.fault for r in self.requests if r.fault is not None)

    def reset(self) -> None:
        """Forget recorded requests and counts (the fault draw starts afresh too)."""
        with self._lock:
            self.requests.clear()
            self.answered = 0
            self.max_in_flight = 0
            self._seen.clear()
            self._script_index = 0

    # -- decisions ---------------------------------------------------------------------------
    def _record(self, body: dict[str, Any], headers: dict[str, str]) -> RecordedRequest:
        blob = json.dumps(body, sort_keys=True)
        with self._lock:
            index = len(self.requests)
            occurrence = self._seen[blob]
            self._seen[blob] += 1
            fault = self._choose_fault(index, body, blob, occurrence)
            record = RecordedRequest(index, body, headers, fault, time.time())
            self.requests.append(record)
        return record

    def _choose_fault(
        self, index: int, body: dict[str, Any], blob: str, occurrence: int
    ) -> str | None:
        if self.faults is not None:
            if callable(self.faults):
                kind = self.faults(index, body)
            else:
                kind = self.faults[index] if index < len(self.faults) else None
            if kind is not None and kind not in _ALL_FAULT_KINDS:
                raise ValueError(f"fault script gave unknown kind {kind!r}")
            return kind
        if self.fault_rate <= 0:
            return None
        digest = hashlib.sha256(f"{self.seed}:{occurrence}:{blob}".encode()).digest()
        draw = random.Random(digest)
        if draw.random() >= self.fault_rate:
            return None
        return draw.choice(self.fault_kinds)

    def _answer_text(self, body: dict[str, Any]) -> str:
        answer = self._answer
        if answer is None:
            return default_answer(body)
        if callable(answer):
            return answer(body)
        if isinstance(answer, str):
            return answer
        with self._lock:
            i = min(self._script_index, len(answer) - 1)
            self._script_index += 1
        return answer[i]


def _usage_for(body: dict[str, Any], text: str) -> dict[str, int]:
    # A rough token count (4 characters a token, 85 per image) so that costs are non-zero.
    prompt_chars = sum(len(t) for m in body.get("messages", []) for t in _message_texts(m))
    prompt = prompt_chars // 4 + 85 * len(_image_urls(body))
    completion = max(1, len(text) // 4)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


class _Handler(BaseHTTPRequestHandler):
    server_ref: ScriptedOpenAIServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
        pass  # keep test output clean; requests are recorded on the server object

    def _send_json(
        self, status: int, payload: dict[str, Any], extra: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(payload).encode()
        self._send_bytes(status, data, extra)

    def _send_bytes(self, status: int, data: bytes, extra: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (its timeout passed during a "delay" fault): nothing to do.
            self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.rstrip("/") == "/v1/models":
            self._send_json(
                200, {"object": "list", "data": [{"id": "scripted", "object": "model"}]}
            )
        else:
            self._send_json(
                404, {"error": {"message": f"no route {self.path}", "type": "not_found"}}
            )

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        srv = self.server_ref
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length)
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send_json(
                404, {"error": {"message": f"no route {self.path}", "type": "not_found"}}
            )
            return
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as exc:
            self._send_json(
                400, {"error": {"message": f"body is not JSON: {exc}", "type": "invalid_request"}}
            )
            return
        record = srv._record(body, {k.lower(): v for k, v in self.headers.items()})
        with srv._lock:
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
        try:
            self._respond(srv, body, record)
        finally:
            with srv._lock:
                srv.in_flight -= 1

    def _respond(
        self, srv: ScriptedOpenAIServer, body: dict[str, Any], record: RecordedRequest
    ) -> None:
        fault = record.fault
        if srv.latency_s > 0:
            time.sleep(srv.latency_s)
        if fault == "429":
            self._send_json(
                429,
                {"error": {"message": "rate limit reached (scripted)", "type": "rate_limit"}},
                {
                    "Retry-After": f"{srv.retry_after_s:g}",
                    "retry-after-ms": str(int(srv.retry_after_s * 1000)),
                },
            )
            return
        if fault == "400":
            echo = self.headers.get("Authorization", "")
            self._send_json(
                400,
                {
                    "error": {
                        "message": f"bad request (scripted); you sent Authorization: {echo}",
                        "type": "invalid_request",
                    }
                },
            )
            return
        if fault == "disconnect":
            self.close_connection = True
            return
        if fault in _ERROR_FAULTS:
            status, message, code = _ERROR_FAULTS[fault]
            self._send_json(status, {"error": {"message": message, "type": code, "code": code}})
            return
        if fault == "delay":
            time.sleep(srv.fault_delay_s)
        text = srv._answer_text(body)
        if fault == "prose":
            text = "Sure! The clusters look fine to me overall, some relevant and some not."
        finish_reason = "stop"
        if fault == "length":
            text, finish_reason = text[: max(1, len(text) // 2)], "length"
        payload = {
            "id": f"chatcmpl-scripted-{record.index}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "scripted"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish_reason,
                }
            ],
            "usage": _usage_for(body, text),
        }
        data = json.dumps(payload).encode()
        if fault == "truncate":
            data = data[: len(data) // 2]
        if fault != "truncate":
            # Counted before sending, so that a client that has the answer sees it counted.
            with srv._lock:
                srv.answered += 1
                answered = srv.answered
            if srv.on_answer is not None:
                srv.on_answer(answered)
        self._send_bytes(200, data)


# -- synthetic inputs -------------------------------------------------------------------------


def _png(pixels: bytes, size: int) -> bytes:
    from PIL import Image

    image = Image.frombytes("L", (size, size), pixels)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def synthetic_requests(
    n: int,
    colors: Sequence[str] = ("red", "blue", "green", "yellow", "pink"),
    *,
    family: str = "decoy-mnist",
    seed: int = 0,
    size: int = 8,
) -> list[Any]:
    """``n`` :class:`~lvlmva.records.CritiqueRequest` with small random PNGs (distinct per
    sample), for exercising LVLM backends without a real data set."""
    import torch

    from lvlmva.records import CritiqueRequest, RenderedSample

    rng = random.Random(seed)
    out = []
    for i in range(n):
        images = [
            _png(bytes(rng.randrange(256) for _ in range(size * size)), size) for _ in range(3)
        ]
        rendered = RenderedSample(
            sample_id=i,
            original=images[0],
            clusters=images[1],
            overlay=images[2],
            colors=tuple(colors),
            files=tuple(
                f"render/sample_{i}_{kind}.png" for kind in ("original", "clusters", "overlay")
            ),
        )
        label = str(i % 10)
        out.append(
            CritiqueRequest(
                sample_id=i,
                label=label,
                class_description=f"The handwritten digit {label}.",
                family=family,
                rendered=rendered,
                cluster_map=torch.zeros(size, size, dtype=torch.int64),
            )
        )
    return out


def data_url_bytes(url: str) -> bytes:
    """The bytes inside a ``data:...;base64,`` URL (for tests that check what was sent)."""
    _, _, payload = url.partition(",")
    return base64.b64decode(payload)
