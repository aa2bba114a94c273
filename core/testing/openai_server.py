"""A local OpenAI-compatible chat-completions server for tests and benchmarks.

It plays scripted answers and injects the faults a real deployment shows: 429 with
``Retry-After``, 500, answers delayed past the client's timeout, truncated bodies, and prose
where JSON was asked for; by script also 401, 403, 404, 503, dropped connections, answers
cut off at ``max_tokens``, and HTML pages with status 200 (a misconfigured proxy). It counts and records every request, so a test can assert how many
calls a run made.

    with ScriptedOpenAIServer(latency_s=0.5) as server:
        critic = OpenAICritic(OpenAICritic.Options(base_url=server.base_url, ...))

The default answerer acts as a well-behaved LVLM pair: a critic request (one with images) gets
one paragraph per cluster colour ending in ``Verdict: yes|no`` (chosen from the image hashes, so
the same images always get the same verdicts), a judge request gets the JSON that matches the
critique it carries. Pass ``answer=`` to script anything else.

It also serves what OpenAI's Batch API needs, offline: ``/v1/files`` (multipart upload as the
``openai`` client sends it, metadata, content) and ``/v1/batches`` (create, retrieve, cancel,
list). A batch runs in a background thread through the same answerer and fault machinery, its
status going ``validating`` -> ``in_progress`` -> ``finalizing`` -> ``completed`` (each step
``batch_delay_s`` long); ``batch_outcomes=`` scripts batches that expire or fail validation, and
``batch_faults=`` (else ``faults=`` / ``fault_rate``) lines that fail.

    with ScriptedOpenAIServer(batch_delay_s=0.1, batch_outcomes=[BatchOutcome.expire(after=2)]):
        ...  # the first batch answers two lines, then expires; later ones complete

Standard library only (``http.server``), loopback by default, one thread per connection.
``GET /stats`` returns the request counts as JSON (:meth:`ScriptedOpenAIServer.stats`).

From the command line (``lvlmva serve-test-lvlm`` is the same)::

    python -m lvlmva.testing.openai_server --port 0 --fault-rate 0.2 --fault-kinds 429,500,prose

prints the base URL, serves until Ctrl-C (or SIGTERM) and prints the counts on exit.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import random
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "FAULT_KINDS",
    "RANDOM_FAULT_KINDS",
    "SCRIPTED_FAULT_KINDS",
    "API_FAULT_KINDS",
    "BATCH_TERMINAL_STATUSES",
    "fault_when",
    "ScriptedOpenAIServer",
    "BatchOutcome",
    "RecordedRequest",
    "RecordedUpload",
    "RecordedCall",
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
#: closed without a response), "length", an answer cut to its first half with
#: ``finish_reason = "length"`` (as when ``max_tokens`` runs out), and "html", an HTTP 200 whose
#: body is an HTML page (``Content-Type: text/html``), as a misconfigured proxy returns
SCRIPTED_FAULT_KINDS = ("401", "403", "404", "503", "disconnect", "length", "html")

_ALL_FAULT_KINDS = FAULT_KINDS + SCRIPTED_FAULT_KINDS

#: the faults ``api_faults=`` can give a ``/v1/files`` or ``/v1/batches`` call (answer-shaping
#: kinds such as "prose" have no meaning there; "delay" stalls and then answers, "truncate" cuts
#: the JSON body in half)
API_FAULT_KINDS = tuple(k for k in _ALL_FAULT_KINDS if k not in ("prose", "length"))

#: the statuses a batch ends in
BATCH_TERMINAL_STATUSES = ("completed", "failed", "expired", "cancelled")

#: the page an "html" fault serves
_HTML_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>Sign in</title></head>\n"
    "<body><h1>Authentication required</h1>\n"
    "<p>Please sign in through the proxy to continue (scripted).</p></body></html>\n"
)

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
    """One request the server received: its JSON body, headers, and what it did with it.

    For a line answered inside a batch (:attr:`ScriptedOpenAIServer.batch_lines`), ``body`` is
    the line's ``body``, ``headers`` those of the request that created the batch, and
    ``custom_id`` / ``batch_id`` say where it came from; for a created batch
    (:attr:`ScriptedOpenAIServer.batch_creates`), ``batch_id`` is the batch's id."""

    index: int
    body: dict[str, Any]
    headers: dict[str, str]
    fault: str | None
    received: float
    custom_id: str | None = None
    batch_id: str | None = None


@dataclass(frozen=True)
class RecordedUpload:
    """One file uploaded to ``POST /v1/files``: the id it got, its name, purpose and bytes."""

    index: int
    file_id: str
    filename: str
    purpose: str
    content: bytes
    headers: dict[str, str]
    received: float


@dataclass(frozen=True)
class RecordedCall:
    """One call to a ``/v1/files`` or ``/v1/batches`` route (answered or not): method, path
    (without the query), the fault ``api_faults`` gave it, and the HTTP status sent (``None``
    when the connection was dropped)."""

    index: int
    method: str
    path: str
    fault: str | None
    status: int | None
    received: float


@dataclass(frozen=True)
class BatchOutcome:
    """What a scripted batch does (``batch_outcomes=``).

    - ``"complete"``: every line is answered (lines may still fail through the fault script).
    - ``"expire"``: ``after`` lines are answered, then the completion window passes: status
      ``expired``, the answered lines in the output / error files, every other line in the error
      file with code ``batch_expired``.
    - ``"fail"``: validation fails: status ``failed``, ``errors.data`` holds ``code``,
      ``message`` and ``line``; no line is answered and no output file is made.
    """

    kind: str = "complete"
    after: int = 0
    code: str = "invalid_request"
    message: str = "The batch failed validation (scripted)."
    line: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("complete", "expire", "fail"):
            raise ValueError(f"unknown batch outcome {self.kind!r}; known: complete, expire, fail")
        if self.after < 0:
            raise ValueError(f"after must be >= 0, got {self.after}")

    @classmethod
    def expire(cls, after: int = 0) -> BatchOutcome:
        """Answer ``after`` lines, then expire."""
        return cls("expire", after=after)

    @classmethod
    def fail(
        cls,
        message: str = "The batch failed validation (scripted).",
        *,
        code: str = "invalid_request",
        line: int | None = None,
    ) -> BatchOutcome:
        """Fail validation with this error."""
        return cls("fail", code=code, message=message, line=line)


BatchScript = Callable[[int, list[dict[str, Any]]], "BatchOutcome | str | None"]
ApiFaultScript = Callable[[int, str, str], "str | None"]


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
    """OpenAI-compatible ``POST /v1/chat/completions`` on ``127.0.0.1`` (a free port), with the
    files and batches routes of OpenAI's Batch API.

    - ``answer``: ``callable(request_json) -> text``, a sequence of texts played in order (the
      last one repeats), a single text, or ``None`` for :func:`default_answer`. Lines answered
      inside batches use it too.
    - ``latency_s``: fixed delay before every synchronous answer.
    - ``fault_rate`` / ``fault_kinds`` / ``seed``: inject a fault into that share of requests.
      The choice is a hash of the seed, the request body and how often that body was seen, so
      it does not depend on the order in which concurrent requests arrive; a repeated request
      draws again (a retry can succeed).
    - ``faults``: an explicit script instead, ``callable(index, request_json) -> kind | None``
      (:func:`fault_when` makes one) or a sequence of kinds (``None`` = answer normally)
      indexed by request number; scripts may also use :data:`SCRIPTED_FAULT_KINDS`.
    - ``retry_after_s``: the ``Retry-After`` a 429 carries; ``fault_delay_s``: how long a
      ``"delay"`` fault stalls (set it past the client's timeout).
    - ``port``: the port to bind (0: a free one); a test can stop a server and start
      another at the same address, as a local server that comes up again. ``host``: the address
      to listen on (loopback by default).

    Batches:

    - ``batch_delay_s``: how long a batch stays ``validating``, takes to answer its lines
      (spread evenly, so ``request_counts`` grows while ``in_progress``), stays ``finalizing``,
      and stays ``cancelling``; 0 runs a batch at once (still in a background thread).
    - ``batch_outcomes``: a sequence of :class:`BatchOutcome` (or ``"complete"``, ``"expire"``,
      ``"fail"``, ``None`` = complete) indexed by the number of the batch created, or
      ``callable(index, lines) -> outcome`` (``lines``: the input file's parsed lines).
    - ``batch_faults``: the fault script for lines answered inside batches, as ``faults``,
      indexed by line number across all batches (:attr:`batch_lines`); ``None`` uses ``faults``
      (by the same line number) or, without it, the ``fault_rate`` draw. A line's HTTP-error
      fault puts it in the error file with that status; "truncate", "disconnect" and "html"
      (which need a connection) make it a 500 there; "prose" and "length" shape its answer;
      "delay" stalls the batch ``fault_delay_s`` before answering it.
    - ``shuffle_batch_output``: write output and error files in a seeded shuffled order (OpenAI
      does not promise input order), so that a client must match lines by ``custom_id``.
    - ``api_faults``: faults for the files and batches routes themselves,
      ``callable(index, method, path) -> kind | None`` or a sequence indexed by call number
      (:attr:`api_calls`); kinds from :data:`API_FAULT_KINDS`.

    Counters: :attr:`count` and :attr:`requests` are synchronous chat completions only;
    :attr:`batch_lines` the lines answered inside batches; :attr:`batches_created` /
    :attr:`batch_creates` the batches made; :attr:`files_uploaded` / :attr:`uploads` the files
    uploaded; :attr:`api_calls` every files/batches call; :meth:`stats` (also ``GET /stats``)
    all of them by endpoint and HTTP status, model and fault.
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
        host: str = "127.0.0.1",
        batch_delay_s: float = 0.0,
        batch_outcomes: BatchScript | Sequence[BatchOutcome | str | None] | None = None,
        batch_faults: FaultScript | Sequence[str | None] | None = None,
        shuffle_batch_output: bool = False,
        api_faults: ApiFaultScript | Sequence[str | None] | None = None,
    ) -> None:
        unknown = [k for k in fault_kinds if k not in _ALL_FAULT_KINDS]
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; known: {', '.join(_ALL_FAULT_KINDS)}")
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be in [0, 1], got {fault_rate}")
        if batch_delay_s < 0:
            raise ValueError(f"batch_delay_s must be >= 0, got {batch_delay_s}")
        if api_faults is not None and not callable(api_faults):
            bad = [k for k in api_faults if k is not None and k not in API_FAULT_KINDS]
            if bad:
                raise ValueError(
                    f"unknown api fault kinds {bad}; known: {', '.join(API_FAULT_KINDS)}"
                )
        if batch_outcomes is not None and not callable(batch_outcomes):
            for outcome in batch_outcomes:
                _as_outcome(outcome)  # fail early on a typo
        self._answer = answer
        self._script_index = 0
        self.latency_s = float(latency_s)
        self.fault_rate = float(fault_rate)
        self.fault_kinds = tuple(fault_kinds)
        self.faults = faults
        self.seed = int(seed)
        self.retry_after_s = float(retry_after_s)
        self.fault_delay_s = float(fault_delay_s)
        self.batch_delay_s = float(batch_delay_s)
        self.batch_outcomes = batch_outcomes
        self.batch_faults = batch_faults
        self.shuffle_batch_output = bool(shuffle_batch_output)
        self.api_faults = api_faults
        self._port = int(port)
        self.host = str(host)
        self._http_counts: Counter[tuple[str, str]] = Counter()
        self.requests: list[RecordedRequest] = []
        self.answered = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.batch_lines: list[RecordedRequest] = []
        self.batch_creates: list[RecordedRequest] = []
        self.uploads: list[RecordedUpload] = []
        self.api_calls: list[RecordedCall] = []
        self._seen: Counter[str] = Counter()
        self._seen_lines: Counter[str] = Counter()
        self._files: dict[str, _StoredFile] = {}
        self._batches: dict[str, _Batch] = {}
        self._workers: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.on_answer: Callable[[int], None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> ScriptedOpenAIServer:
        """Bind to a free loopback port and serve in a daemon thread."""
        if self._httpd is not None:
            raise RuntimeError("server already started")
        self._stopping.clear()
        handler = type("_Handler", (_Handler,), {"server_ref": self})
        server_cls = type("_Server", (ThreadingHTTPServer,), {"request_queue_size": 256})
        # A deep listen backlog: the default of 5 drops bursts of concurrent connects.
        server_cls.allow_reuse_address = True
        if ":" in self.host:
            server_cls.address_family = socket.AF_INET6
        self._httpd = server_cls((self.host, self._port), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="openai-test-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, stop running batches where they are, and free the port."""
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for worker in self._workers:
            worker.join(timeout=5)
        self._workers.clear()

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
        """What a client's ``base_url`` should be: ``http://127.0.0.1:PORT/v1`` (with another
        ``host``, that host; listening on every address, the loopback one)."""
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/v1"

    # -- counts ------------------------------------------------------------------------------
    @property
    def count(self) -> int:
        """Synchronous chat-completion requests received (faulted ones included; lines answered
        inside batches are not counted here but in :attr:`batch_line_count`)."""
        with self._lock:
            return len(self.requests)

    @property
    def batch_line_count(self) -> int:
        """Lines answered (or failed) inside batches; lines never run are not counted."""
        with self._lock:
            return len(self.batch_lines)

    @property
    def batches_created(self) -> int:
        """Batches created by ``POST /v1/batches`` (rejected requests are not counted)."""
        with self._lock:
            return len(self.batch_creates)

    @property
    def files_uploaded(self) -> int:
        """Files uploaded by ``POST /v1/files`` (rejected uploads are not counted)."""
        with self._lock:
            return len(self.uploads)

    def stats(self) -> dict[str, Any]:
        """The request counts, as ``GET /stats`` returns them: ``requests`` (every HTTP request
        but those to ``/stats``), ``by_endpoint`` (``"POST /v1/chat/completions"`` ->
        ``{"total": n, "200": n, "500": n, ...}``; ids in paths as ``{id}``, a dropped
        connection as ``"dropped"``), ``chat_completions`` and ``batch_lines`` (``total``,
        ``by_model``, ``by_fault``; chat also ``answered``), ``batches_created``,
        ``files_uploaded`` and ``max_in_flight``."""

        def summary(records: list[RecordedRequest]) -> dict[str, Any]:
            return {
                "total": len(records),
                "by_model": dict(Counter(_model_of(r.body) for r in records)),
                "by_fault": dict(Counter(r.fault for r in records if r.fault is not None)),
            }

        with self._lock:
            endpoints: dict[str, dict[str, int]] = {}
            for (route, status), n in sorted(self._http_counts.items()):
                entry = endpoints.setdefault(route, {"total": 0})
                entry["total"] += n
                entry[status] = n
            return {
                "requests": sum(self._http_counts.values()),
                "by_endpoint": endpoints,
                "chat_completions": {**summary(self.requests), "answered": self.answered},
                "batch_lines": summary(self.batch_lines),
                "batches_created": len(self.batch_creates),
                "files_uploaded": len(self.uploads),
                "max_in_flight": self.max_in_flight,
            }

    def _count_http(self, route: str, status: str) -> None:
        with self._lock:
            self._http_counts[(route, status)] += 1

    def fault_counts(self) -> Counter[str]:
        """How many synchronous requests got each fault."""
        with self._lock:
            return Counter(r.fault for r in self.requests if r.fault is not None)

    def reset(self) -> None:
        """Forget recorded requests, lines, uploads, batch creations, calls and counts (the
        fault draw and the batch outcome script start afresh too). Stored files and batches
        stay retrievable."""
        with self._lock:
            self.requests.clear()
            self.answered = 0
            self.max_in_flight = 0
            self._seen.clear()
            self._script_index = 0
            self.batch_lines.clear()
            self.batch_creates.clear()
            self.uploads.clear()
            self.api_calls.clear()
            self._seen_lines.clear()
            self._http_counts.clear()

    # -- inspection --------------------------------------------------------------------------
    def batch(self, batch_id: str) -> dict[str, Any]:
        """The batch object as ``GET /v1/batches/{id}`` would return it now."""
        with self._lock:
            return self._batches[batch_id].to_json()

    def file_content(self, file_id: str) -> bytes:
        """The bytes of a stored file (an upload or a batch's output or error file)."""
        with self._lock:
            return self._files[file_id].content

    def wait_for_batch(self, batch_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """Wait until the batch reaches a terminal status (:data:`BATCH_TERMINAL_STATUSES`)
        and return its object; ``TimeoutError`` if it does not within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            batch = self.batch(batch_id)
            if batch["status"] in BATCH_TERMINAL_STATUSES:
                return batch
            if time.monotonic() > deadline:
                raise TimeoutError(f"batch {batch_id} still {batch['status']} after {timeout}s")
            time.sleep(0.01)

    # -- decisions ---------------------------------------------------------------------------
    def _record(self, body: dict[str, Any], headers: dict[str, str]) -> RecordedRequest:
        blob = json.dumps(body, sort_keys=True)
        with self._lock:
            index = len(self.requests)
            occurrence = self._seen[blob]
            self._seen[blob] += 1
            fault = self._choose_fault(self.faults, index, body, blob, occurrence)
            record = RecordedRequest(index, body, headers, fault, time.time())
            self.requests.append(record)
        return record

    def _record_line(
        self, body: dict[str, Any], headers: dict[str, str], custom_id: str, batch_id: str
    ) -> RecordedRequest:
        blob = json.dumps(body, sort_keys=True)
        script = self.batch_faults if self.batch_faults is not None else self.faults
        with self._lock:
            index = len(self.batch_lines)
            occurrence = self._seen_lines[blob]
            self._seen_lines[blob] += 1
            fault = self._choose_fault(script, index, body, blob, occurrence)
            record = RecordedRequest(
                index, body, headers, fault, time.time(), custom_id=custom_id, batch_id=batch_id
            )
            self.batch_lines.append(record)
        return record

    def _choose_fault(
        self,
        script: FaultScript | Sequence[str | None] | None,
        index: int,
        body: dict[str, Any],
        blob: str,
        occurrence: int,
    ) -> str | None:
        if script is not None:
            if callable(script):
                kind = script(index, body)
            else:
                kind = script[index] if index < len(script) else None
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

    def _api_fault(self, method: str, path: str) -> RecordedCall:
        with self._lock:
            index = len(self.api_calls)
            kind: str | None = None
            if self.api_faults is not None:
                if callable(self.api_faults):
                    kind = self.api_faults(index, method, path)
                elif index < len(self.api_faults):
                    kind = self.api_faults[index]
            if kind is not None and kind not in API_FAULT_KINDS:
                raise ValueError(f"api fault script gave unknown kind {kind!r}")
            call = RecordedCall(index, method, path, kind, None, time.time())
            self.api_calls.append(call)
        return call

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

    def _completion(self, body: dict[str, Any], fault: str | None, ident: str) -> dict[str, Any]:
        """The chat-completion JSON for ``body`` (shaped by a "prose" or "length" fault)."""
        text = self._answer_text(body)
        if fault == "prose":
            text = "Sure! The clusters look fine to me overall, some relevant and some not."
        finish_reason = "stop"
        if fault == "length":
            text, finish_reason = text[: max(1, len(text) // 2)], "length"
        return {
            "id": f"chatcmpl-scripted-{ident}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "scripted"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": _usage_for(body, text),
        }

    # -- files -------------------------------------------------------------------------------
    def _store_file(self, content: bytes, filename: str, purpose: str) -> _StoredFile:
        now = int(time.time())
        stored = _StoredFile(
            id=f"file-{uuid.uuid4().hex[:24]}",
            filename=filename,
            purpose=purpose,
            content=content,
            created_at=now,
            # OpenAI keeps batch input files (and, by default, batch outputs) for 30 days.
            expires_at=now + 30 * 86400 if purpose in ("batch", "batch_output") else None,
        )
        with self._lock:
            self._files[stored.id] = stored
        return stored

    # -- batches -----------------------------------------------------------------------------
    def _create_batch(
        self, request: dict[str, Any], headers: dict[str, str]
    ) -> tuple[int, dict[str, Any]]:
        """Validate a ``POST /v1/batches`` body; make the batch and start its worker."""
        for name in ("input_file_id", "endpoint", "completion_window"):
            if not isinstance(request.get(name), str):
                return 400, _error(
                    f"Missing required parameter: '{name}'.",
                    param=name,
                    code="missing_required_parameter",
                )
        if request["endpoint"] != "/v1/chat/completions":
            return 400, _error(
                f"Invalid value for 'endpoint': {request['endpoint']!r}; this server answers "
                "'/v1/chat/completions' only.",
                param="endpoint",
                code="invalid_value",
            )
        if request["completion_window"] != "24h":
            return 400, _error(
                "Invalid value for 'completion_window': only '24h' is supported.",
                param="completion_window",
                code="invalid_value",
            )
        metadata = request.get("metadata")
        if metadata is not None and not (
            isinstance(metadata, dict)
            and len(metadata) <= 16
            and all(isinstance(k, str) and len(k) <= 64 for k in metadata)
            and all(isinstance(v, str) and len(v) <= 512 for v in metadata.values())
        ):
            return 400, _error(
                "Invalid 'metadata': at most 16 string pairs, keys up to 64 characters, values "
                "up to 512.",
                param="metadata",
                code="invalid_value",
            )
        with self._lock:
            stored = self._files.get(request["input_file_id"])
            if stored is None:
                return 404, _error(
                    f"No such File object: {request['input_file_id']}", param="input_file_id"
                )
            if stored.purpose != "batch":
                return 400, _error(
                    f"The input file must be uploaded with purpose 'batch', not "
                    f"{stored.purpose!r}.",
                    param="input_file_id",
                    code="invalid_value",
                )
            batch = _Batch(
                id=f"batch_{uuid.uuid4().hex}",
                number=len(self.batch_creates),
                input_file_id=stored.id,
                endpoint=request["endpoint"],
                completion_window=request["completion_window"],
                metadata=dict(metadata) if metadata is not None else None,
                headers=headers,
                created_at=int(time.time()),
            )
            self._batches[batch.id] = batch
            self.batch_creates.append(
                RecordedRequest(
                    batch.number, request, headers, None, time.time(), batch_id=batch.id
                )
            )
            snapshot = batch.to_json()
            worker = threading.Thread(
                target=self._run_batch, args=(batch,), name=f"batch-{batch.id}", daemon=True
            )
            self._workers.append(worker)
        worker.start()
        return 200, snapshot

    def _cancel_batch(self, batch_id: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            batch = self._batches.get(batch_id)
            if batch is None:
                return 404, _error(f"No batch found with id '{batch_id}'.", param="batch_id")
            if batch.status in ("validating", "in_progress"):
                batch.status = "cancelling"
                batch.cancelling_at = int(time.time())
            elif batch.status != "cancelling":
                return 409, _error(f"Cannot cancel a batch with status '{batch.status}'.")
            return 200, batch.to_json()

    def _outcome_for(self, batch: _Batch, lines: list[dict[str, Any]]) -> BatchOutcome:
        script = self.batch_outcomes
        if script is None:
            return BatchOutcome()
        if callable(script):
            return _as_outcome(script(batch.number, lines))
        return _as_outcome(script[batch.number] if batch.number < len(script) else None)

    def _wait(self, seconds: float) -> bool:
        """Sleep; ``False`` when the server is stopping (the worker should give up)."""
        if seconds <= 0:
            return not self._stopping.is_set()
        return not self._stopping.wait(seconds)

    def _run_batch(self, batch: _Batch) -> None:
        if not self._wait(self.batch_delay_s):
            return
        with self._lock:
            content = self._files[batch.input_file_id].content
        lines, errors = _validate_batch_input(content, batch.endpoint)
        outcome = self._outcome_for(batch, lines) if not errors else BatchOutcome()
        if outcome.kind == "fail":
            errors = [
                {
                    "code": outcome.code,
                    "message": outcome.message,
                    "param": None,
                    "line": outcome.line,
                }
            ]
        with self._lock:
            cancelling = batch.status == "cancelling"
            if not cancelling and errors:
                batch.status = "failed"
                batch.failed_at = int(time.time())
                batch.errors = errors
                return
            if not cancelling:
                batch.status = "in_progress"
                batch.in_progress_at = int(time.time())
                batch.model = lines[0]["body"].get("model") if lines else None
                batch.total = len(lines)
        if cancelling:  # cancelled while validating: nothing ran
            if self._wait(self.batch_delay_s):
                with self._lock:
                    self._finish_cancel_locked(batch, [])
            return
        results: list[dict[str, Any]] = []  # one output or error line per line run
        pause = self.batch_delay_s / max(1, len(lines))
        ran = 0
        for line in lines:
            with self._lock:
                if batch.status == "cancelling":
                    break
            if outcome.kind == "expire" and ran >= outcome.after:
                break
            record = self._record_line(line["body"], batch.headers, line["custom_id"], batch.id)
            if record.fault == "delay" and not self._wait(self.fault_delay_s):
                return
            entry, ok, usage = self._answer_line(batch, record)
            with self._lock:
                results.append(entry)
                if ok:
                    batch.completed += 1
                else:
                    batch.failed += 1
                if usage is not None:
                    batch.add_usage(usage)
            ran += 1
            if not self._wait(pause):
                return
        with self._lock:
            cancelling = batch.status == "cancelling"
        if cancelling:
            if not self._wait(self.batch_delay_s):
                return
            with self._lock:
                self._finish_cancel_locked(batch, results)
            return
        if outcome.kind == "expire":
            expired = [
                {
                    "id": f"batch_req_{uuid.uuid4().hex}",
                    "custom_id": line["custom_id"],
                    "response": None,
                    "error": {
                        "code": "batch_expired",
                        "message": "This request could not be executed before the completion "
                        "window expired.",
                    },
                }
                for line in lines[ran:]
            ]
            self._write_results(batch, results + expired)
            with self._lock:
                batch.status = "expired"
                batch.expired_at = int(time.time())
            return
        with self._lock:
            batch.status = "finalizing"
            batch.finalizing_at = int(time.time())
        if not self._wait(self.batch_delay_s):
            return
        self._write_results(batch, results)
        with self._lock:
            batch.status = "completed"
            batch.completed_at = int(time.time())

    def _finish_cancel_locked(self, batch: _Batch, results: list[dict[str, Any]]) -> None:
        # Lines never run are in neither file (as OpenAI leaves them): match by custom_id.
        output, errors = self._result_files(batch, results)
        batch.output_file_id, batch.error_file_id = output, errors
        batch.status = "cancelled"
        batch.cancelled_at = int(time.time())

    def _write_results(self, batch: _Batch, results: list[dict[str, Any]]) -> None:
        with self._lock:
            batch.output_file_id, batch.error_file_id = self._result_files(batch, results)

    def _result_files(
        self, batch: _Batch, results: list[dict[str, Any]]
    ) -> tuple[str | None, str | None]:
        """Store the output file (lines answered with status 200) and the error file (the
        rest); each is ``None`` when it would be empty. Called with the lock held."""
        if self.shuffle_batch_output:
            results = list(results)
            random.Random(f"{self.seed}:{batch.id}").shuffle(results)
        ok: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        for result in results:
            response = result["response"]
            (ok if response is not None and response["status_code"] == 200 else failed).append(
                result
            )
        ids: list[str | None] = []
        for kind, rows in (("output", ok), ("error", failed)):
            if not rows:
                ids.append(None)
                continue
            content = "".join(json.dumps(r) + "\n" for r in rows).encode()
            now = int(time.time())
            stored = _StoredFile(
                id=f"file-{uuid.uuid4().hex[:24]}",
                filename=f"{batch.id}_{kind}.jsonl",
                purpose="batch_output",
                content=content,
                created_at=now,
                expires_at=now + 30 * 86400,
            )
            self._files[stored.id] = stored
            ids.append(stored.id)
        return ids[0], ids[1]

    def _answer_line(
        self, batch: _Batch, record: RecordedRequest
    ) -> tuple[dict[str, Any], bool, dict[str, int] | None]:
        """The output-file entry for one line, whether it succeeded, and its usage."""
        fault = record.fault
        request_id = f"req_{uuid.uuid4().hex}"
        entry: dict[str, Any] = {
            "id": f"batch_req_{uuid.uuid4().hex}",
            "custom_id": record.custom_id,
            "response": None,
            "error": None,
        }
        if fault is None or fault in ("prose", "length", "delay"):
            payload = self._completion(record.body, fault, f"{batch.id}-{record.index}")
            entry["response"] = {"status_code": 200, "request_id": request_id, "body": payload}
            return entry, True, payload["usage"]
        if fault == "429":
            status, body = (
                429,
                _error(
                    "Rate limit reached (scripted).", type_="requests", code="rate_limit_exceeded"
                ),
            )
        elif fault == "400":
            echo = batch.headers.get("authorization", "")
            status, body = 400, _error(f"bad request (scripted); you sent Authorization: {echo}")
        elif fault in _ERROR_FAULTS:
            status, message, code = _ERROR_FAULTS[fault]
            status, body = status, _error(message, type_=code, code=code)
        else:  # "truncate", "disconnect", "html": no connection to break inside a batch
            status, body = (
                500,
                _error(
                    f"The server had an error processing your request (scripted {fault}).",
                    type_="server_error",
                    code="server_error",
                ),
            )
        entry["response"] = {"status_code": status, "request_id": request_id, "body": body}
        return entry, False, None


@dataclass
class _StoredFile:
    id: str
    filename: str
    purpose: str
    content: bytes
    created_at: int
    expires_at: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


@dataclass
class _Batch:
    id: str
    number: int
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None
    headers: dict[str, str]
    created_at: int
    status: str = "validating"
    model: str | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    errors: list[dict[str, Any]] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    usage: dict[str, int] = field(
        default_factory=lambda: {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
    )

    def add_usage(self, usage: dict[str, int]) -> None:
        self.usage["input_tokens"] += usage["prompt_tokens"]
        self.usage["output_tokens"] += usage["completion_tokens"]
        self.usage["total_tokens"] += usage["total_tokens"]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": {"object": "list", "data": list(self.errors)} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.in_progress_at,
            "expires_at": self.created_at + 86400,
            "finalizing_at": self.finalizing_at,
            "completed_at": self.completed_at,
            "failed_at": self.failed_at,
            "expired_at": self.expired_at,
            "cancelling_at": self.cancelling_at,
            "cancelled_at": self.cancelled_at,
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "usage": {
                "input_tokens": self.usage["input_tokens"],
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": self.usage["output_tokens"],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.usage["total_tokens"],
            },
            "metadata": dict(self.metadata) if self.metadata is not None else None,
        }


def _as_outcome(outcome: BatchOutcome | str | None) -> BatchOutcome:
    if outcome is None:
        return BatchOutcome()
    if isinstance(outcome, BatchOutcome):
        return outcome
    if isinstance(outcome, str):
        return BatchOutcome(outcome)
    raise ValueError(f"a batch outcome is a BatchOutcome, a kind name or None, not {outcome!r}")


#: the most lines OpenAI accepts in one batch input file
_MAX_BATCH_LINES = 50_000


def _validate_batch_input(
    content: bytes, endpoint: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The parsed lines of a batch input file and the validation errors (``errors.data``
    entries with a 1-based ``line``). The checks are those OpenAI documents for the input file:
    JSON lines with ``custom_id`` (unique), ``method`` POST, ``url`` equal to the batch's
    endpoint, a ``body``, one model throughout, at most 50,000 requests. The error codes are
    this server's, except where noted."""
    errors: list[dict[str, Any]] = []

    def error(code: str, message: str, line: int | None, param: str | None = None) -> None:
        errors.append({"code": code, "message": message, "param": param, "line": line})

    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        error("invalid_file_format", "The input file is not UTF-8 text.", None)
        return [], errors
    lines: list[dict[str, Any]] = []
    seen: set[str] = set()
    model: str | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            error("invalid_json_line", "This line is not parseable as valid JSON.", number)
            continue
        if not isinstance(line, dict):
            error("invalid_json_line", "This line is not a JSON object.", number)
            continue
        missing = [k for k in ("custom_id", "method", "url", "body") if k not in line]
        if missing:
            error(
                "missing_required_parameter",
                f"Missing required parameter: '{missing[0]}'.",
                number,
                missing[0],
            )
            continue
        if not isinstance(line["custom_id"], str) or not line["custom_id"]:
            error("invalid_value", "'custom_id' must be a non-empty string.", number, "custom_id")
            continue
        if line["custom_id"] in seen:
            error(
                "duplicate_custom_id",
                "The custom_id for this request is a duplicate of "
                "another request. The custom_id parameter must be unique for each request in "
                "a batch.",
                number,
                "custom_id",
            )
            continue
        seen.add(line["custom_id"])
        if line["method"] != "POST":
            error("invalid_value", "Only 'POST' is supported as 'method'.", number, "method")
            continue
        if line["url"] != endpoint:
            error(
                "invalid_url",
                f"The URL provided for this request does not match the batch endpoint {endpoint}.",
                number,
                "url",
            )
            continue
        if not isinstance(line["body"], dict):
            error("invalid_value", "'body' must be a JSON object.", number, "body")
            continue
        line_model = line["body"].get("model")
        if not isinstance(line_model, str):
            error(
                "missing_required_parameter",
                "Missing required parameter: 'body.model'.",
                number,
                "body.model",
            )
            continue
        if model is None:
            model = line_model
        elif line_model != model:
            error(
                "mismatched_model",
                "The provided model does not match the model of the other "
                f"requests in the batch ({model}).",
                number,
                "body.model",
            )
            continue
        lines.append(line)
    if not lines and not errors:
        error("empty_file", "The input file has no requests.", None)
    if len(lines) > _MAX_BATCH_LINES:
        error(
            "too_many_requests",
            f"The input file has {len(lines)} requests; the limit is {_MAX_BATCH_LINES}.",
            None,
        )
    return lines, errors


def _error(
    message: str,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


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


#: the purposes ``POST /v1/files`` accepts (OpenAI's upload purposes)
_UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")

#: OpenAI's limit on a batch input file
_MAX_BATCH_FILE_BYTES = 200 * 1024 * 1024


def _parse_multipart(content_type: str, raw: bytes) -> dict[str, tuple[str | None, bytes]]:
    """The fields of a ``multipart/form-data`` body: name -> (filename or None, bytes)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if match is None:
        raise ValueError("multipart body without a boundary")
    delimiter = b"--" + match.group(1).encode("latin-1")
    fields: dict[str, tuple[str | None, bytes]] = {}
    parts = raw.split(delimiter)
    if len(parts) < 3 or not parts[-1].startswith(b"--"):
        raise ValueError("multipart body is not closed by its boundary")
    for part in parts[1:-1]:
        if not part.startswith(b"\r\n") or not part.endswith(b"\r\n"):
            raise ValueError("malformed multipart part")
        head, sep, data = part[2:-2].partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("multipart part without a header block")
        disposition = ""
        for header in head.decode("latin-1").split("\r\n"):
            key, _, value = header.partition(":")
            if key.strip().lower() == "content-disposition":
                disposition = value
        name = re.search(r'(?:^|;)\s*name="([^"]*)"', disposition)
        if name is None:
            raise ValueError("multipart part without a name")
        filename = re.search(r'filename="([^"]*)"', disposition)
        fields[name.group(1)] = (filename.group(1) if filename else None, data)
    return fields


class _Handler(BaseHTTPRequestHandler):
    server_ref: ScriptedOpenAIServer
    protocol_version = "HTTP/1.1"
    route: str | None = None  # "POST /v1/chat/completions": what the counts call this request

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
        pass  # keep test output clean; requests are recorded on the server object

    def _send_json(
        self, status: int, payload: dict[str, Any], extra: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(payload).encode()
        self._send_bytes(status, data, extra)

    def _send_bytes(
        self,
        status: int,
        data: bytes,
        extra: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        if self.route is not None:
            # Counted before sending, so that a client that has the response sees it counted.
            self.server_ref._count_http(self.route, str(status))
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (its timeout passed during a "delay" fault): nothing to do.
            self.close_connection = True

    def _read_body(self) -> bytes:
        """The request body, by ``Content-Length`` or chunked transfer encoding."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send_fault(self, fault: str) -> bool:
        """Send the response of an error-like fault; ``False`` for kinds that shape an answer
        instead ("delay", "truncate", "prose", "length")."""
        srv = self.server_ref
        if fault == "429":
            self._send_json(
                429,
                {"error": {"message": "rate limit reached (scripted)", "type": "rate_limit"}},
                {
                    "Retry-After": f"{srv.retry_after_s:g}",
                    "retry-after-ms": str(int(srv.retry_after_s * 1000)),
                },
            )
            return True
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
            return True
        if fault == "disconnect":
            if self.route is not None:
                srv._count_http(self.route, "dropped")
            self.close_connection = True
            return True
        if fault == "html":
            self._send_bytes(200, _HTML_PAGE.encode(), content_type="text/html; charset=utf-8")
            return True
        if fault in _ERROR_FAULTS:
            status, message, code = _ERROR_FAULTS[fault]
            self._send_json(status, {"error": {"message": message, "type": code, "code": code}})
            return True
        return False

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self._dispatch("POST")

    def do_DELETE(self) -> None:  # noqa: N802 - http.server's name
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        raw = self._read_body()
        url = urlsplit(self.path)
        path = url.path.rstrip("/")
        if method == "GET" and path == "/stats":
            self.route = None  # reading the counts does not change them
            self._send_json(200, self.server_ref.stats())
            return
        self.route = f"{method} {_route_of(path)}"
        if method == "POST" and path == "/v1/chat/completions":
            self._chat(raw)
            return
        if method == "GET" and path == "/v1/models":
            self._send_json(
                200, {"object": "list", "data": [{"id": "scripted", "object": "model"}]}
            )
            return
        if path == "/v1/files" or path.startswith(("/v1/files/", "/v1/batches")):
            self._api(method, path, parse_qs(url.query), raw)
            return
        self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

    # -- synchronous chat completions --------------------------------------------------------
    def _chat(self, raw: bytes) -> None:
        srv = self.server_ref
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
        if fault is not None and self._send_fault(fault):
            return
        if fault == "delay":
            time.sleep(srv.fault_delay_s)
        payload = srv._completion(body, fault, str(record.index))
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

    # -- files and batches -------------------------------------------------------------------
    def _api(self, method: str, path: str, query: dict[str, list[str]], raw: bytes) -> None:
        srv = self.server_ref
        call = srv._api_fault(method, path)
        fault = call.fault

        def settle(status: int | None) -> None:
            # Recorded before sending, so that a client that has the response sees it recorded.
            with srv._lock:
                if call.index < len(srv.api_calls) and srv.api_calls[call.index] is call:
                    srv.api_calls[call.index] = RecordedCall(
                        call.index, method, path, fault, status, call.received
                    )

        if fault is not None and fault in _FAULT_STATUS:
            settle(_FAULT_STATUS[fault])
            self._send_fault(fault)
            return
        if fault == "delay":
            time.sleep(srv.fault_delay_s)
        status, data, content_type = self._api_reply(method, path, query, raw)
        if fault == "truncate":
            data = data[: len(data) // 2]
        settle(status)
        self._send_bytes(status, data, content_type=content_type)

    def _api_reply(
        self, method: str, path: str, query: dict[str, list[str]], raw: bytes
    ) -> tuple[int, bytes, str]:
        srv = self.server_ref
        parts = path.split("/")[2:]  # "/v1/files/ID/content" -> ["files", "ID", "content"]
        headers = {k.lower(): v for k, v in self.headers.items()}

        def reply(status: int, payload: dict[str, Any]) -> tuple[int, bytes, str]:
            return status, json.dumps(payload).encode(), "application/json"

        if parts == ["files"] and method == "POST":
            return reply(*self._upload(raw, headers))
        if parts == ["files"] and method == "GET":
            with srv._lock:
                files = [f.to_json() for f in srv._files.values()]
            purpose = query.get("purpose", [None])[0]
            files = [f for f in files if purpose is None or f["purpose"] == purpose]
            return reply(200, {"object": "list", "data": files[::-1], "has_more": False})
        if parts[0] == "files" and len(parts) in (2, 3):
            with srv._lock:
                stored = srv._files.get(parts[1])
            if stored is None:
                return reply(404, _error(f"No such File object: {parts[1]}", param="id"))
            if len(parts) == 3 and parts[2] == "content" and method == "GET":
                return 200, stored.content, "application/octet-stream"
            if len(parts) == 2 and method == "GET":
                return reply(200, stored.to_json())
            if len(parts) == 2 and method == "DELETE":
                with srv._lock:
                    srv._files.pop(stored.id, None)
                return reply(200, {"id": stored.id, "object": "file", "deleted": True})
        if parts == ["batches"] and method == "POST":
            try:
                request = json.loads(raw)
            except json.JSONDecodeError as exc:
                return reply(400, _error(f"body is not JSON: {exc}"))
            if not isinstance(request, dict):
                return reply(400, _error("body must be a JSON object"))
            return reply(*srv._create_batch(request, headers))
        if parts == ["batches"] and method == "GET":
            return reply(200, self._list_batches(query))
        if parts[0] == "batches" and len(parts) == 2 and method == "GET":
            with srv._lock:
                batch = srv._batches.get(parts[1])
                payload = batch.to_json() if batch is not None else None
            if payload is None:
                return reply(404, _error(f"No batch found with id '{parts[1]}'.", param="batch_id"))
            return reply(200, payload)
        if parts[0] == "batches" and len(parts) == 3 and parts[2] == "cancel" and method == "POST":
            return reply(*srv._cancel_batch(parts[1]))
        return reply(404, {"error": {"message": f"no route {method} {path}", "type": "not_found"}})

    def _upload(self, raw: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        srv = self.server_ref
        content_type = headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            return 400, _error("Files are uploaded as multipart/form-data.")
        try:
            fields = _parse_multipart(content_type, raw)
        except ValueError as exc:
            return 400, _error(f"Could not parse the multipart body: {exc}.")
        purpose = fields.get("purpose", (None, b""))[1].decode("utf-8", "replace")
        if "purpose" not in fields:
            return 400, _error(
                "Missing required parameter: 'purpose'.",
                param="purpose",
                code="missing_required_parameter",
            )
        if purpose not in _UPLOAD_PURPOSES:
            return 400, _error(
                f"Invalid value for 'purpose': {purpose!r}.", param="purpose", code="invalid_value"
            )
        if "file" not in fields or fields["file"][0] is None:
            return 400, _error(
                "Missing required parameter: 'file'.",
                param="file",
                code="missing_required_parameter",
            )
        filename, content = fields["file"]
        assert filename is not None
        if purpose == "batch":
            if not filename.endswith(".jsonl"):
                return 400, _error(
                    "Invalid file format for Batch API. Must be .jsonl",
                    param="file",
                    code="invalid_file_format",
                )
            if len(content) > _MAX_BATCH_FILE_BYTES:
                return 400, _error(
                    "A batch input file can be at most 200 MB.", param="file", code="file_too_large"
                )
        stored = srv._store_file(content, filename, purpose)
        with srv._lock:
            srv.uploads.append(
                RecordedUpload(
                    len(srv.uploads), stored.id, filename, purpose, content, headers, time.time()
                )
            )
        return 200, stored.to_json()

    def _list_batches(self, query: dict[str, list[str]]) -> dict[str, Any]:
        srv = self.server_ref
        try:
            limit = max(1, min(100, int(query.get("limit", ["20"])[0])))
        except ValueError:
            limit = 20
        with srv._lock:
            batches = [b.to_json() for b in srv._batches.values()][::-1]  # newest first
        after = query.get("after", [None])[0]
        if after is not None:
            ids = [b["id"] for b in batches]
            batches = batches[ids.index(after) + 1 :] if after in ids else []
        page = batches[:limit]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(batches) > limit,
        }


def _model_of(body: Any) -> str:
    return str(body.get("model", "")) if isinstance(body, dict) else ""


def _route_of(path: str) -> str:
    """A path as the counts name it: ids of files and batches as ``{id}``
    (``/v1/batches/batch_1/cancel`` -> ``/v1/batches/{id}/cancel``)."""
    parts = path.split("/")
    if len(parts) >= 4 and parts[:3] in (["", "v1", "files"], ["", "v1", "batches"]):
        parts[3] = "{id}"
    return "/".join(parts) or "/"


#: the HTTP status each error-like fault sends (for :class:`RecordedCall`)
_FAULT_STATUS: dict[str, int | None] = {
    "429": 429,
    "400": 400,
    "html": 200,
    "disconnect": None,
    **{k: v[0] for k, v in _ERROR_FAULTS.items()},
}


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


# -- command line -----------------------------------------------------------------------------

#: what each fault kind does, for ``--help``
FAULT_HELP = {
    "429": "HTTP 429 with Retry-After (--retry-after)",
    "500": "HTTP 500",
    "delay": "an answer held back --fault-delay seconds (past a client's timeout)",
    "truncate": "a body cut in half (not JSON)",
    "prose": "prose instead of the asked format (an invalid answer)",
    "400": "HTTP 400 echoing the Authorization header",
    "401": "HTTP 401",
    "403": "HTTP 403",
    "404": "HTTP 404",
    "503": "HTTP 503",
    "disconnect": "the connection closed without a response",
    "length": "half an answer with finish_reason=length",
    "html": "HTTP 200 with an HTML page (a misconfigured proxy)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The test server's command-line arguments (``lvlmva serve-test-lvlm``, ``python -m
    lvlmva.testing.openai_server``)."""
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, loopback only)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=0,
        help="port to listen on (default 0: any free port; the base URL is printed)",
    )
    parser.add_argument(
        "--fault-rate",
        type=float,
        default=0.0,
        metavar="RATE",
        help="the share of chat requests (and batch lines) that get a fault, 0 to 1 (default 0); the kind is drawn "
        "from --fault-kinds, seeded by --seed and the request, so a retry draws again",
    )
    parser.add_argument(
        "--fault-kinds",
        default=",".join(RANDOM_FAULT_KINDS),
        metavar="KIND[,KIND]",
        help="the faults drawn, comma-separated (default: "
        + ",".join(RANDOM_FAULT_KINDS)
        + "); "
        + "; ".join(f"{k}: {v}" for k, v in FAULT_HELP.items()),
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault draw (default 0)")
    parser.add_argument(
        "--latency",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="delay before every answer (default 0)",
    )
    parser.add_argument(
        "--retry-after",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="the Retry-After a 429 carries (default 1)",
    )
    parser.add_argument(
        "--fault-delay",
        type=float,
        default=150.0,
        metavar="SECONDS",
        help="how long a 'delay' fault holds the answer back (default 150: past the OpenAI critic's and judge's "
        "default timeout_s of 120; with a smaller timeout_s, a smaller value tries timeouts faster)",
    )
    parser.add_argument(
        "--batch-delay",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="how long each step of a Batch API batch takes (validating, in progress, finalizing; default 1)",
    )


def _server_from(args: argparse.Namespace) -> ScriptedOpenAIServer:
    """The server ``args`` describe; ``ValueError`` names a bad value."""
    kinds = tuple(k.strip() for k in args.fault_kinds.split(",") if k.strip())
    unknown = [k for k in kinds if k not in _ALL_FAULT_KINDS]
    if unknown or not kinds:
        raise ValueError(
            f"--fault-kinds: unknown kind(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(_ALL_FAULT_KINDS)}"
        )
    if not 0.0 <= args.fault_rate <= 1.0:
        raise ValueError(f"--fault-rate must be between 0 and 1, got {args.fault_rate:g}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
    for name in ("latency", "retry_after", "fault_delay", "batch_delay"):
        if not getattr(args, name) >= 0:
            raise ValueError(
                f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name):g}"
            )
    return ScriptedOpenAIServer(
        host=args.host,
        port=args.port,
        fault_rate=args.fault_rate,
        fault_kinds=kinds,
        seed=args.seed,
        latency_s=args.latency,
        retry_after_s=args.retry_after,
        fault_delay_s=args.fault_delay,
        batch_delay_s=args.batch_delay,
    )


def serve(args: argparse.Namespace, prog: str = "serve-test-lvlm") -> int:
    """Serve until SIGINT or SIGTERM: the base URL on standard output, the counts on exit; the
    exit code (0, or 2 for a bad argument or an address that cannot be bound)."""
    try:
        server = _server_from(args)
        server.start()
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(
            f"{prog}: error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 2
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        root = server.base_url.removesuffix("/v1")
        print(server.base_url, flush=True)
        faults = (
            f"fault rate {server.fault_rate:g} ({', '.join(server.fault_kinds)})"
            if server.fault_rate
            else "no faults"
        )
        print(
            f"{prog}: scripted OpenAI-compatible server at {server.base_url} ({faults}); counts: {root}/stats; Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )
        if server.host not in ("127.0.0.1", "localhost", "::1"):
            print(
                f"{prog}: listening on {server.host}: anyone who can reach it can use it",
                file=sys.stderr,
                flush=True,
            )
        while not stop.wait(0.2):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("request counts (as GET /stats returned them):")
    print(json.dumps(server.stats(), indent=2), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lvlmva.testing.openai_server",
        description="A scripted OpenAI-compatible chat-completions server (and Batch API) for trying a pipeline "
        "offline: critic requests (with images) get one 'Verdict: yes|no' paragraph per cluster colour, judge "
        "requests the matching JSON. Prints its base URL; GET /stats returns the request counts; runs until "
        "Ctrl-C. Not an LVLM: its verdicts come from image hashes.",
    )
    add_arguments(parser)
    return serve(parser.parse_args(argv), prog="openai_server")


if __name__ == "__main__":
    sys.exit(main())
