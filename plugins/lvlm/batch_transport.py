"""The transport to OpenAI's Batch API: one round of requests as one batch job, at batch prices.

:meth:`OpenAIBatchTransport.answer` writes the requests as one JSONL file (a line per request:
``custom_id``, ``POST /v1/chat/completions`` and the body a chat request would send), uploads it,
creates a batch and polls it every ``batch_poll_s`` seconds, printing its status and counts.
When it ends it reads the output and error files and delivers every request's answer, or a
retryable failure naming the cause and the batch. Answers, keys and checks are those of
:class:`~.openai_transport.OpenAITransport`: cached answers serve both.

A batch can take hours, so its id is written to ``<records>/<role>-<hash>.json`` (atomically)
as soon as it exists. A later call whose requests are all in a recorded batch re-attaches to it
(no upload, no new batch); one that ended clears its record once its outcomes are delivered. A
custom id is the role and the hash of the request's body, so a rerun maps lines back to the same
requests whatever their order.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from lvlmva.secrets import redact

from .openai_transport import OpenAITransport, _connection_failure, _server_message, cost_usd
from .transport import ChatAnswer, ChatRequest, Outcome, TransportFailure

__all__ = ["OpenAIBatchTransport", "ENDPOINT", "TERMINAL"]

T = TypeVar("T")
ENDPOINT = "/v1/chat/completions"
#: the statuses a batch ends in
TERMINAL = ("completed", "failed", "expired", "cancelled")


class _Unfinished(Exception):
    """The batch could not be made or followed now (``status``: the HTTP status of a refusal):
    every request of the call fails, retryably, and a recorded batch stays recorded."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class OpenAIBatchTransport(OpenAITransport):
    """Chat completions through OpenAI's Batch API (``records``: the folder of pending-batch
    records; ``say``: prints a progress line)."""

    def __init__(self, options: Any, role: str, address: str, key: Callable[[], str], records: Path,
                 say: Callable[[str], None] | None = None) -> None:  # fmt: skip
        super().__init__(options, role, address, key)
        self.records = Path(records)
        self._say = say or (lambda text: print(f"  > {role}: {text}", file=sys.stderr, flush=True))
        self._batch_id: str | None = None

    # -- which lines are which requests --------------------------------------------------------
    def custom_ids(self, requests: Sequence[ChatRequest]) -> list[str]:
        """``<role>-<hash of the body>`` per request (``-2``, ... for a repeated body)."""
        seen: Counter[str] = Counter()
        ids = []
        for request in requests:
            digest = hashlib.sha256(json.dumps(self.body(request), sort_keys=True).encode()).hexdigest()[:32]  # fmt: skip
            seen[digest] += 1
            ids.append(f"{self.role}-{digest}" + (f"-{seen[digest]}" if seen[digest] > 1 else ""))
        return ids

    def pending(self, requests: Sequence[ChatRequest]) -> tuple[Path, dict[str, Any]] | None:
        """The record of a batch an earlier call submitted that holds all of ``requests``."""
        wanted = set(self.custom_ids(requests))
        for path in sorted(self.records.glob(f"{self.role}-*.json")):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # not a record this version can read
            if wanted and wanted <= set(record.get("custom_ids", ())):
                return path, record
        return None

    # -- asking ----------------------------------------------------------------------------------
    async def answer(self, requests: Sequence[ChatRequest], deliver: Callable[[int, Outcome], None]) -> None:  # fmt: skip
        if not requests:
            return
        self._key = self._read_key()
        ids = self.custom_ids(requests)
        found = self.pending(requests)
        try:
            async with self._client() as client:
                batch = await self._attach(client, *found) if found is not None else None
                if batch is None:
                    batch, found = await self._submit(client, requests, ids)
                batch = await self._wait(client, batch)
                outcomes = await self._results(client, batch, {cid: i for i, cid in enumerate(ids)})
        except _Unfinished as exc:
            kept = f"; batch {self._batch_id} stays recorded: a new run waits for it" if self._batch_id else ""  # fmt: skip
            for i in range(len(requests)):  # nothing is known to have been answered
                deliver(i, TransportFailure(redact(f"{exc}{kept}"), True, attempts=0))
            return
        except asyncio.CancelledError:
            if self._batch_id is not None:
                self._say(f"stopped while batch {self._batch_id} runs; a new run with the same settings picks it up")  # fmt: skip
            raise
        missing = TransportFailure(
            self._missing(batch), True, attempts=0
        )  # in neither file: never run
        for i in range(len(requests)):
            deliver(i, outcomes.get(i, missing))
        found[0].unlink(missing_ok=True)  # delivered: nothing more to wait for

    async def _call(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, retried on transient errors as chat requests are; :class:`_Unfinished`
        naming ``what`` and the cause when it does not succeed."""
        import openai

        rng, cause = random.Random(what), ""
        for attempt in range(1, self.options.max_attempts + 1):
            try:
                return await call()
            except openai.APITimeoutError:
                cause = f"timed out after {self.options.timeout_s:g} s"
            except openai.APIConnectionError as exc:
                refused, reason = _connection_failure(exc)
                cause = "connection refused" if refused else f"connection error ({reason})"
            except openai.APIStatusError as exc:
                cause = f"HTTP {exc.status_code}: {redact(_server_message(exc))}"
                if exc.status_code not in (408, 429) and exc.status_code < 500:  # a refusal
                    raise _Unfinished(f"Batch API: {what}: {cause} at {self.address}", exc.status_code) from None  # fmt: skip
            except (openai.APIResponseValidationError, ValueError) as exc:
                cause = f"unreadable response ({redact(str(exc))[:100]})"
            if attempt < self.options.max_attempts:
                await asyncio.sleep(self._backoff(attempt - 1, rng))
        raise _Unfinished(f"Batch API: {what}: {cause} at {self.address}")

    async def _attach(self, client: Any, path: Path, record: dict[str, Any]) -> Any:
        """The recorded batch, or ``None`` (record dropped) when the server no longer has it."""
        batch_id = record["batch_id"]
        try:
            batch = await self._call(f"retrieving batch {batch_id}", lambda: client.batches.retrieve(batch_id))  # fmt: skip
        except _Unfinished as exc:
            if exc.status != 404:
                raise
            self._say(f"batch {batch_id} (recorded {_ago(record)}) no longer exists at {self.address}: submitting anew")  # fmt: skip
            path.unlink(missing_ok=True)
            return None
        self._batch_id = batch_id
        self._say(f"re-attaching to batch {batch_id}, submitted {_ago(record)} by an earlier run: nothing is uploaded or sent again")  # fmt: skip
        return batch

    async def _submit(self, client: Any, requests: Sequence[ChatRequest], ids: list[str]) -> tuple[Any, tuple[Path, dict[str, Any]]]:  # fmt: skip
        """Upload the input file, create the batch and record it before anything else."""
        lines = "".join(json.dumps({"custom_id": cid, "method": "POST", "url": ENDPOINT, "body": self.body(r)}) + "\n"
                        for cid, r in zip(ids, requests, strict=True))  # fmt: skip
        digest = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:24]
        file = (f"lvlmva-{self.role}-{digest}.jsonl", lines.encode(), "application/jsonl")
        upload = await self._call("uploading the input file", lambda: client.files.create(file=file, purpose="batch"))  # fmt: skip
        tries = 0

        async def create() -> Any:
            nonlocal tries
            tries += 1
            if tries > 1:  # the failed attempt may have made the batch before its reply was lost
                for made in (await client.batches.list(limit=100)).data:
                    if made.input_file_id == upload.id:
                        return made
            return await client.batches.create(
                input_file_id=upload.id, endpoint=ENDPOINT, completion_window=self.options.batch_completion_window,
                metadata={"lvlmva_requests": digest, "lvlmva_role": self.role})  # fmt: skip

        batch = await self._call("creating the batch", create)
        self._batch_id = batch.id
        record = {"batch_id": batch.id, "input_file_id": upload.id, "role": self.role, "model": self.model,
                  "address": redact(self.address), "created": time.time(), "custom_ids": sorted(ids)}  # fmt: skip
        path = self.records / f"{self.role}-{digest}.json"
        _write_atomically(path, record)
        self._say(f"batch {batch.id} created for {len(ids)} requests, recorded in {path} (a run stopped now picks it up again)")  # fmt: skip
        return batch, (path, record)

    async def _wait(self, client: Any, batch: Any) -> Any:
        """Poll until the batch ends, printing its status and counts when they change."""
        shown = None
        while True:
            c = batch.request_counts
            done, failed, total = (c.completed, c.failed, c.total) if c else (0, 0, 0)
            if (batch.status, done, failed) != shown:
                shown = (batch.status, done, failed)
                self._say(f"batch {batch.id} {batch.status}: {done} of {total or '?'} done, {failed} failed")  # fmt: skip
            if batch.status in TERMINAL:
                return batch
            await asyncio.sleep(self.options.batch_poll_s)
            batch_id = batch.id
            batch = await self._call(f"polling batch {batch_id}", lambda b=batch_id: client.batches.retrieve(b))  # fmt: skip

    async def _results(self, client: Any, batch: Any, index: dict[str, int]) -> dict[int, Outcome]:
        """Each request's outcome from the output and error files, matched by custom id."""
        outcomes: dict[int, Outcome] = {}
        for file_id in filter(None, (batch.output_file_id, batch.error_file_id)):
            what = f"downloading {file_id} of batch {batch.id}"
            content = await self._call(what, lambda f=file_id: client.files.content(f))
            for line in content.text.splitlines():
                try:
                    entry = json.loads(line)
                    i = index.get(entry["custom_id"])
                except (ValueError, TypeError, KeyError):
                    continue  # a line that names no request: its request gets no result below
                if i is not None:
                    outcomes[i] = self._outcome(entry, batch.id)
        answers = [o for o in outcomes.values() if isinstance(o, ChatAnswer)]
        self._say(f"batch {batch.id} {batch.status}: {len(answers)} answered, {len(index) - len(answers)} failed; "
                  f"{sum(a.prompt_tokens for a in answers)} prompt + {sum(a.completion_tokens for a in answers)} "
                  f"completion tokens, ${sum(a.cost_usd for a in answers):.4f} at batch prices "
                  f"(batch_price_factor = {self.options.batch_price_factor:g} of prices)")  # fmt: skip
        return outcomes

    def _outcome(self, entry: dict[str, Any], batch_id: str) -> Outcome:
        """A line of the output or error file as an answer, or a failure naming its cause."""
        response = entry.get("response") or {}
        body = response.get("body") if isinstance(response.get("body"), dict) else {}
        choices = body.get("choices")
        if response.get("status_code") == 200 and isinstance(choices, list) and choices:
            usage = body.get("usage") or {}
            prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)  # fmt: skip
            cost = cost_usd(self.options.prices, self.model, prompt, completion)
            return ChatAnswer(
                text=redact((choices[0].get("message") or {}).get("content") or ""),
                finish_reason=choices[0].get("finish_reason"), prompt_tokens=prompt, completion_tokens=completion,
                cost_usd=0.0 if cost is None else cost * self.options.batch_price_factor,
            )  # fmt: skip
        error = entry.get("error") or body.get("error") or {}
        if error.get("code") == "batch_expired":
            window = self.options.batch_completion_window
            cause = f"batch {batch_id} expired (completion window {window}) before answering it"
        elif response:
            message = error.get("message") or "not a chat completion"
            cause = f"HTTP {response.get('status_code')}: {message} in batch {batch_id}"
        else:
            cause = f"{error.get('code')}: {error.get('message')} in batch {batch_id}"
        ran = int(error.get("code") != "batch_expired")  # an expired line was never run
        return TransportFailure(redact(f"{cause} at {self.address}"), True, ran, (redact(cause),))

    def _missing(self, batch: Any) -> str:
        """Why a request has no line in the batch's files."""
        if batch.status == "failed":
            errors = getattr(batch.errors, "data", None) or []
            why = "; ".join(f"{e.code}: {e.message}" for e in errors) or "no reason given"
            return redact(f"batch {batch.id} failed: {why} at {self.address}")
        if batch.status == "completed":
            return f"batch {batch.id} completed without a result for this request at {self.address}"
        return f"batch {batch.id} {batch.status} before answering this request at {self.address}"


def _ago(record: dict[str, Any]) -> str:
    seconds = max(0.0, time.time() - float(record.get("created", time.time())))
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def _write_atomically(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` as JSON so that ``path`` holds the old or the new text, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
