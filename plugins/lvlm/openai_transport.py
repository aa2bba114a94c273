"""The transport to an OpenAI-compatible chat-completions server (OpenAI, vLLM, Ollama, ...).

Requests run concurrently up to ``concurrency``. Transient failures (429, 408, 5xx, timeouts,
dropped connections, bodies that are not a chat completion, such as a proxy's HTML page) are
retried with exponential backoff and jitter, honouring ``Retry-After`` up to ``backoff_max_s``;
other HTTP errors (400, 401, 404, ...: settings to fix) are not. A request that gets no answer is
a retryable :class:`~.transport.TransportFailure` whose message names the last cause and the
server, the same for every request it hit; each attempt's error is kept for the transcript.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import random
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from lvlmva.secrets import redact

from .cache import sha256_hex
from .transport import AnswerSchema, ChatAnswer, ChatRequest, Outcome, TransportFailure

__all__ = ["OpenAITransport", "retry_after_seconds", "cost_usd"]


def cost_usd(prices: dict[str, Any], model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
    """Cost of one call; the longest price-table name that ``model`` starts with applies
    (``gpt-4o-2024-08-06`` -> ``gpt-4o``). ``None`` when the table has no entry (local models)."""
    matches = [name for name in prices if model == name or model.startswith(name + "-")]
    if not matches:
        return None
    price = prices[max(matches, key=len)]
    return (prompt_tokens * price.prompt_per_1k + completion_tokens * price.completion_per_1k) / 1000.0


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds a server asked us to wait: ``retry-after-ms``, then ``Retry-After`` as seconds or
    an HTTP date; ``None`` when absent or unreadable."""
    if headers is None:
        return None
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            return max(0.0, float(raw_ms) / 1000.0)
        except ValueError:
            pass  # fall through to Retry-After
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass  # not a number: maybe an HTTP date
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class OpenAITransport:
    """Chat completions for one role (``options``: the plugin's; ``address``: the server as
    failures name it; ``key``: reads the API key, called once before the first request)."""

    kind = "openai"

    def __init__(self, options: Any, role: str, address: str, key: Callable[[], str]) -> None:
        self.options, self.role, self.address = options, role, address
        self.model = options.model
        self._read_key = key
        self._key = ""

    # -- what a request is -----------------------------------------------------------------------
    def _params(self, request: ChatRequest) -> dict[str, Any]:
        params: dict[str, Any] = {"temperature": self.options.temperature, "max_tokens": self.options.max_tokens}
        if self.options.send_seed:
            params["seed"] = request.seed
        return params

    def _response_format(self, schema: AnswerSchema | None) -> dict[str, Any]:
        kind = getattr(self.options, "response_format", "none")
        if schema is None or kind == "none":
            return {}
        if kind == "json_object":
            return {"response_format": {"type": "json_object"}}
        return {"response_format": {"type": "json_schema", "json_schema": {
            "name": schema.name, "schema": schema.schema, "strict": self.options.schema_strict}}}  # fmt: skip

    def key_parts(self, request: ChatRequest) -> dict[str, Any]:
        """The backend, role, model, prompt (the text; with instructions ``[system, user]``),
        the images' hashes, and every parameter sent that shapes the answer."""
        params = {**self._params(request), **self._response_format(request.schema), "extra_body": self.options.extra_body}
        parts: dict[str, Any] = {"backend": self.kind, "role": self.role, "model": self.model}
        if request.images:
            params["image_detail"] = self.options.image_detail
            parts["images"] = [sha256_hex(png) for png in request.images]
        parts["prompt"] = request.user if request.system is None else [request.system, request.user]
        return {**parts, "params": params}

    def messages(self, request: ChatRequest) -> list[dict[str, Any]]:
        """The chat as the API takes it: instructions, the prompt followed by its images, turns."""
        content: Any = request.user
        if request.images:
            detail = self.options.image_detail
            content = [{"type": "text", "text": request.user}] + [
                {"type": "image_url", "image_url": {"url": _data_url(png), "detail": detail}}
                for png in request.images
            ]
        system = [{"role": "system", "content": request.system}] if request.system is not None else []
        turns = [{"role": role, "content": text} for role, text in request.turns]
        return [*system, {"role": "user", "content": content}, *turns]

    def body(self, request: ChatRequest) -> dict[str, Any]:
        """The JSON body of the chat-completions request, as it goes over the wire (``extra_body``
        merged in): what a batch API's input file holds per line."""
        return {**self._fields(request), **self.options.extra_body}

    def _fields(self, request: ChatRequest) -> dict[str, Any]:
        return {"model": self.model, "messages": self.messages(request), **self._params(request),
                **self._response_format(request.schema)}  # fmt: skip

    # -- asking ----------------------------------------------------------------------------------
    async def answer(self, requests: Sequence[ChatRequest], deliver: Callable[[int, Outcome], None]) -> None:
        self._key = self._read_key()  # a key that cannot be used stops the call before any request
        semaphore = asyncio.Semaphore(self.options.concurrency)
        async with self._client() as client:

            async def one(i: int, request: ChatRequest) -> None:
                deliver(i, await self._complete(client, semaphore, request))

            await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))

    def _client(self) -> Any:
        import openai

        return openai.AsyncOpenAI(
            api_key=self._key,
            base_url=self.options.base_url,
            timeout=self.options.timeout_s,
            max_retries=0,  # retries are ours: counted, logged, and honouring Retry-After
        )

    def _backoff(self, retry: int, rng: random.Random) -> float:
        base = min(self.options.backoff_max_s, self.options.backoff_initial_s * (2.0**retry))
        return base * (1.0 - self.options.jitter * rng.random())

    async def _complete(self, client: Any, semaphore: asyncio.Semaphore, request: ChatRequest) -> Outcome:
        """One chat completion with retries on transient failures. Each attempt's error goes
        into ``errors``; a failure names only the last cause and the server."""
        import openai

        o = self.options
        rng = random.Random(f"{request.seed}:{self.role}:{request.label}")  # jitter, repeatable
        errors: list[str] = []
        cause = ""
        for attempt in range(1, o.max_attempts + 1):
            wait: float | None = None
            try:
                async with semaphore:
                    raw = await client.chat.completions.with_raw_response.create(
                        **self._fields(request), extra_body=o.extra_body or None
                    )
                    response = raw.parse()
            except openai.APITimeoutError:
                cause = f"timed out after {o.timeout_s:g} s"
                errors.append(f"attempt {attempt}: {cause}")
            except openai.APIConnectionError as exc:
                refused, reason = _connection_failure(exc)
                cause = "connection refused" if refused else f"connection error ({reason})"
                errors.append(f"attempt {attempt}: connection error: {reason}" + ("; connection refused" if refused else ""))
            except openai.APIStatusError as exc:
                status, message = exc.status_code, redact(_server_message(exc))
                errors.append(f"attempt {attempt}: HTTP {status}: {message}")
                if status not in (408, 429) and status < 500:
                    # 400, 401, 403, 404, ...: a setting to fix, which no retry would change
                    hint = ""
                    if status == 400 and request.schema is not None and getattr(o, "response_format", "none") != "none":
                        hint = ' (if the server does not support structured output, set judge.response_format = "json_object" or "none")'
                    return TransportFailure(f"HTTP {status}: {message} at {self.address}{hint}", True, attempt, tuple(errors))
                cause = "HTTP 429 (rate limited)" if status == 429 else f"HTTP {status}"
                wait = retry_after_seconds(getattr(exc.response, "headers", None))
            except openai.APIResponseValidationError as exc:
                cause = "unreadable response"
                errors.append(f"attempt {attempt}: unreadable response: {redact(str(exc))}")
            except ValueError as exc:  # a body cut short fails JSON decoding
                cause = "unreadable response body"
                errors.append(f"attempt {attempt}: unreadable response body: {redact(str(exc))}")
            else:
                unreadable = _not_a_completion(response, raw)
                if unreadable is None:
                    return self._answer(response, attempt, errors)
                cause = unreadable
                errors.append(f"attempt {attempt}: {unreadable}")
            if attempt < o.max_attempts:
                # A server may ask for any wait; backoff_max_s bounds how long a run stalls.
                await asyncio.sleep(min(wait, o.backoff_max_s) if wait is not None else self._backoff(attempt - 1, rng))
        return TransportFailure(f"{cause} at {self.address}", True, o.max_attempts, tuple(errors))

    def _answer(self, response: Any, attempts: int, errors: list[str]) -> ChatAnswer:
        choice = response.choices[0] if response.choices else None
        content = choice.message.content if choice is not None else None
        usage = response.usage
        prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion = int(getattr(usage, "completion_tokens", 0) or 0)
        cost = cost_usd(self.options.prices, self.model, prompt, completion)
        return ChatAnswer(
            text=redact(content or ""),  # a server that echoes the key: it reaches no cache or file
            finish_reason=None if choice is None else choice.finish_reason,
            prompt_tokens=prompt, completion_tokens=completion, cost_usd=0.0 if cost is None else cost,
            attempts=attempts, errors=tuple(errors),
        )  # fmt: skip


def _not_a_completion(response: Any, raw: Any) -> str | None:
    """What came back instead of a chat completion (an HTML page, JSON without ``choices``),
    or ``None``; the same text for the same body, so that equal causes read alike."""
    if not isinstance(response, str) and isinstance(getattr(response, "choices", None), list):
        return None
    content_type = (raw.headers.get("content-type") or "no Content-Type").split(";")[0].strip()
    body = " ".join(str(raw.text).split())
    # redacted before it is cut short: a cut through a key would leave a part no redaction knows
    shown = redact(body)[:100] + ("..." if len(body) > 100 else "")
    what = "not JSON" if isinstance(response, str) else "JSON that is not a chat completion"
    return f"unreadable response: HTTP {raw.status_code} {content_type}, {what}: {shown!r}"


def _connection_failure(exc: BaseException) -> tuple[bool, str]:
    """``(refused, reason)`` of a connection error: whether its exception chain holds a refused
    connection (deep down, past the HTTP library's own errors), and the HTTP library's message
    (the client's own, "Connection error.", says nothing)."""
    refused = False
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionRefusedError) or (
            isinstance(current, OSError) and current.errno == errno.ECONNREFUSED
        ):
            refused = True
        current = current.__cause__ or current.__context__
    transport = exc.__cause__ or exc.__context__ or exc
    # redacted before it is cut short: a cut through a key would leave a part no redaction knows
    return refused, redact(str(transport) or type(transport).__name__)[:120]


def _server_message(exc: Any) -> str:
    """The message of a server's error body (``{"error": {"message": ...}}``), else the
    client's text."""
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"]
    return str(exc.message)


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
