"""Critic and Judge through any OpenAI-compatible chat-completions server.

Works with OpenAI itself and with local servers that speak the same protocol (vLLM, Ollama,
llama.cpp, LM Studio). Requests run concurrently up to ``concurrency``; transient failures
(429, 5xx, timeouts, dropped connections, unreadable bodies) are retried with exponential
backoff and jitter, honouring ``Retry-After`` up to ``backoff_max_s``. Answers go into a shared
SQLite response cache, so a re-run never pays twice. Every exchange is written to
``transcripts.jsonl``.

A request that gets no answer (transport errors after the retries, and HTTP errors such as 401
that no retry fixes) is a ``retryable`` failure whose text names the cause and the server, the
same for every sample it hit; an answer that was had but cannot be used (empty, cut off at
``max_tokens``, a judge answer still invalid after repair) is a failure that is not retryable.

The API key is read from the environment variable named by ``api_key_env`` and kept in memory
only: it never enters a cache key, a transcript, a failure message or a settings file. Whitespace
around it (the CR of a line read from a CRLF ``.env`` file) is stripped; a key with whitespace,
control or non-ASCII characters inside it is refused before any work, naming the variable. The
key, as read and as stripped, is registered with :mod:`lvlmva.secrets` the moment it is read, and
every text this backend stores, returns or raises passes through its ``redact``: an HTTP library
that quotes the header in an error message, or a server that echoes it, leaves ``[redacted]``.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import os
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import parse_qsl, urlsplit

from pydantic import ConfigDict, Field, ValidationInfo, field_validator

from lvlmva.protocols import PluginOptions, RunContext
from lvlmva.records import Critique, CritiqueRequest, Usage, Verdicts
from lvlmva.secrets import redact, redact_json, register_secret
from lvlmva.templates import builtin_families

from .cache import ResponseCache, open_response_cache, sha256_hex
from .prompts import (
    PromptTemplate,
    TemplateBook,
    TemplateError,
    load_template,
    render_critic_prompt,
    render_judge_prompt,
)
from .verdict_schema import (
    JudgeAnswerError,
    ParsedVerdicts,
    judge_json_schema,
    parse_judge_answer,
)

__all__ = [
    "DEFAULT_PRICES",
    "ModelPrice",
    "OpenAIOptions",
    "OpenAICritic",
    "OpenAIJudge",
    "RequestFailed",
    "SpendingEstimate",
    "cost_usd",
    "estimate_spending",
    "image_tokens",
    "retry_after_seconds",
]

T = TypeVar("T")

#: placeholder key for servers that need none (``api_key_env = ""``)
NO_KEY = "not-needed"

#: where the client sends requests when neither ``base_url`` nor ``$OPENAI_BASE_URL`` says
DEFAULT_BASE_URL = "https://api.openai.com/v1"

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: what an API key is made of once stripped: printable ASCII without spaces (an HTTP header value
#: that no HTTP library refuses)
_KEY_CHARS = re.compile(r"^[\x21-\x7e]+$")
#: query parameter names that carry a credential (``?api_key=``, ``?access_token=``, ``?auth=``)
_CREDENTIAL_PARAM = re.compile(r"key|token|secret|passw(?:or)?d|auth", re.IGNORECASE)


class ModelPrice(PluginOptions):
    """USD per 1,000 tokens for one model."""

    prompt_per_1k: float = Field(..., ge=0, description="USD per 1,000 prompt (input) tokens.")
    completion_per_1k: float = Field(
        ..., ge=0, description="USD per 1,000 completion (output) tokens."
    )


#: list prices in USD per 1,000 tokens (standard tier); override with the ``prices`` option
DEFAULT_PRICES: dict[str, dict[str, float]] = {
    "gpt-4o": {"prompt_per_1k": 0.0025, "completion_per_1k": 0.01},
    "gpt-4o-mini": {"prompt_per_1k": 0.00015, "completion_per_1k": 0.0006},
    "gpt-4.1": {"prompt_per_1k": 0.002, "completion_per_1k": 0.008},
    "gpt-4.1-mini": {"prompt_per_1k": 0.0004, "completion_per_1k": 0.0016},
    "gpt-5": {"prompt_per_1k": 0.00125, "completion_per_1k": 0.01},
    "gpt-5-mini": {"prompt_per_1k": 0.00025, "completion_per_1k": 0.002},
}


def cost_usd(
    prices: dict[str, ModelPrice], model: str, prompt_tokens: int, completion_tokens: int
) -> float | None:
    """Cost of one call; the longest price-table name that ``model`` starts with applies
    (``gpt-4o-2024-08-06`` -> ``gpt-4o``). ``None`` when the table has no entry (local models)."""
    matches = [name for name in prices if model == name or model.startswith(name + "-")]
    if not matches:
        return None
    price = prices[max(matches, key=len)]
    return (
        prompt_tokens * price.prompt_per_1k + completion_tokens * price.completion_per_1k
    ) / 1000.0


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


def _is_key_like(name: str) -> bool:
    """Whether an ``api_key_env`` value is more likely a key than a variable's name: OpenAI's
    ``sk-`` prefix, or a long run of lowercase letters and digits as keys and tokens are."""
    if name.startswith(("sk-", "sk_")):
        return True
    return (
        len(name) >= 24
        and "_" not in name
        and any(c.islower() for c in name)
        and any(c.isdigit() for c in name)
    )


class OpenAIOptions(PluginOptions):
    """Settings shared by the OpenAI-compatible critic and judge."""

    # A value refused below may be a secret: pydantic's error text must not repeat any input.
    model_config = ConfigDict(hide_input_in_errors=True)

    model: str = Field(
        "gpt-4o",
        min_length=1,
        description="Model name as the server knows it (gpt-4o, Qwen/Qwen2.5-VL-7B-Instruct, llava:13b, ...).",
    )
    base_url: str | None = Field(
        None,
        description="Server URL ending in /v1 (vLLM: http://127.0.0.1:8000/v1, Ollama: http://127.0.0.1:11434/v1). None: OpenAI (or $OPENAI_BASE_URL). Never part of the cache key; a URL with credentials (user:password@, ?api_key=...) is refused.",
        json_schema_extra={"redact_errors": True},
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description='Name of the environment variable holding the API key (never the key itself: a value that looks like a key is refused). "" for local servers that need no key.',
        json_schema_extra={"redact_errors": True},
    )
    temperature: float = Field(
        0.0,
        ge=0,
        le=2,
        description="Sampling temperature (0 = as deterministic as the server allows).",
    )
    max_tokens: int = Field(1024, ge=1, description="Most tokens the model may answer with.")
    send_seed: bool = Field(
        True,
        description="Send the run seed with each request (servers that support it sample reproducibly); turn off for servers that reject the field.",
    )
    timeout_s: float = Field(
        120.0,
        gt=0,
        allow_inf_nan=True,  # inf: no timeout (gt keeps nan and -inf out)
        description="Seconds to wait for one answer before the attempt counts as timed out.",
        json_schema_extra={"fingerprint": False},
    )
    max_attempts: int = Field(
        5,
        ge=1,
        description="HTTP attempts per request on transient errors (429, 5xx, timeouts, connection errors, unreadable bodies).",
        json_schema_extra={"fingerprint": False},
    )
    backoff_initial_s: float = Field(
        1.0,
        ge=0,
        description="Wait before the first retry; doubles each retry (with jitter) up to backoff_max_s.",
        json_schema_extra={"fingerprint": False},
    )
    backoff_max_s: float = Field(
        60.0,
        ge=0,
        allow_inf_nan=True,  # inf: no cap, any Retry-After is honoured (ge keeps nan out)
        description="Longest wait between retries; a server's Retry-After (or retry-after-ms) is honoured up to this too.",
        json_schema_extra={"fingerprint": False},
    )
    jitter: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Share of each backoff wait drawn at random, so that concurrent retries spread out.",
        json_schema_extra={"fingerprint": False},
    )
    concurrency: int = Field(
        8,
        ge=1,
        description="Requests in flight at once across the alignment set.",
        json_schema_extra={"fingerprint": False},
    )
    image_detail: Literal["auto", "low", "high"] = Field(
        "auto", description="Image detail level sent with each image (OpenAI's 'detail')."
    )
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra JSON fields sent with each request (server-specific, e.g. vLLM's top_k). Part of the cache key.",
    )
    template: str | None = Field(
        None,
        description="Path to a prompt template TOML of your own; None: the built-in template of the data set's family.",
        json_schema_extra={"fingerprint": "content"},
    )
    family: str | None = Field(
        None,
        description="Template family to use (decoy-mnist, knee, skin, ...); None: the family of each sample.",
    )
    cache: bool = Field(
        True, description="Read and write the response cache (--refresh still skips reading)."
    )
    cache_dir: Path | None = Field(
        None,
        description="Folder of responses.sqlite; None: the run's cache directory.",
        json_schema_extra={"fingerprint": False},
    )
    prices: dict[str, ModelPrice] = Field(
        default_factory=lambda: {k: ModelPrice(**v) for k, v in DEFAULT_PRICES.items()},
        description="USD per 1,000 tokens by model name, {model = {prompt_per_1k, completion_per_1k}}; models not listed cost 0 (reported as unknown).",
    )
    max_requests: int | None = Field(
        None,
        ge=0,
        description="Most requests this stage may send, retries not counted (the judge counts its repair rounds); a run that may need more stops before any work. None: no limit.",
        json_schema_extra={"fingerprint": False},
    )
    max_cost_usd: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=True,  # inf: no limit, the one --set can write over a file's budget
        description="Most USD this stage may cost by an upper estimate (every request with the longest prompt and a max_tokens answer, at the prices in prices); a run estimated above it stops before any work. None: no limit.",
        json_schema_extra={"fingerprint": False},
    )

    @field_validator("api_key_env")
    @classmethod
    def _a_name_not_a_key(cls, name: str) -> str:
        # The messages never repeat the value: it may be the key itself.
        if not name:
            return name
        if _is_key_like(name):
            raise ValueError(
                "this looks like an API key, not the name of an environment variable: "
                "export the key in a variable (e.g. OPENAI_API_KEY) and give its name here"
            )
        if not _ENV_NAME.match(name):
            raise ValueError(
                "not a valid environment variable name (letters, digits and _, not starting "
                'with a digit): give the name of the variable that holds the key, or "" for a '
                "server that needs no key"
            )
        return name

    @field_validator("base_url")
    @classmethod
    def _a_url_without_credentials(cls, url: str | None) -> str | None:
        # The messages never repeat the value: it may hold a credential.
        if url is None:
            return url
        try:
            parts = urlsplit(url)
            params = parse_qsl(parts.query, keep_blank_values=True)
        except ValueError:
            raise ValueError("not a URL: give the server's http(s):// URL ending in /v1") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                "not an http:// or https:// URL with a host (e.g. http://127.0.0.1:8000/v1)"
            )
        if "@" in parts.netloc:
            raise ValueError(
                "the URL holds credentials (user:password@host); put the key in the variable "
                "named by api_key_env instead"
            )
        if any(_CREDENTIAL_PARAM.search(name) for name, _ in params):
            raise ValueError(
                "the URL has a query parameter named like a credential (key, token, secret, "
                "password, auth); put the key in the variable named by api_key_env instead"
            )
        return url


#: images a critic request carries: the original, the cluster map, the overlay
CRITIC_IMAGES = 3

#: characters per token of English prompt text, the usual rough rule
CHARS_PER_TOKEN = 4


def image_tokens(detail: str) -> int:
    """Prompt tokens OpenAI counts for one rendered image: 85 at detail "low"; otherwise 85 plus
    170 per 512-px tile, and the renderer's 224..512 px images take one tile."""
    return 85 if detail == "low" else 85 + 170


@dataclass(frozen=True)
class SpendingEstimate:
    """An upper estimate of what one stage may send: ``requests`` (retries not counted, and why
    that many in ``basis``), tokens per request, and ``cost_usd`` (``None`` when ``prices`` has
    no entry for the model)."""

    requests: int
    basis: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None


def _class_descriptions(family: str) -> tuple[str, ...]:
    """The family's shipped class descriptions (none for a family without a specification)."""
    from lvlmva.datasets.class_specs import available_families, load_class_spec

    return load_class_spec(family)[1] if family in available_families() else ()


def _template_chars(role: str, options: OpenAIOptions) -> int:
    """Characters of the longest prompt a template of ``role`` can give before the sample's own
    text: the user's file, or the family's built-in one, else the longest built-in one."""
    if options.template is not None:
        templates = [load_template(options.family or "custom", role, options.template)]
    else:
        families = [options.family] if options.family else builtin_families()
        templates = [load_template(family, role) for family in families]

    def chars(t: PromptTemplate) -> int:
        if role == "judge":
            return len(t.text) + len(t.user)
        return len(t.text) + max(map(len, _class_descriptions(t.family)), default=0)

    return max(map(chars, templates), default=0)


def estimate_spending(role: str, options: OpenAIOptions, samples: int) -> SpendingEstimate:
    """Most requests and cost a ``role`` stage may need for ``samples`` alignment samples, every
    answer assumed uncached and ``max_tokens`` long. Raises :class:`TemplateError` when the
    template the options name does not load."""
    prompt_tokens = _template_chars(role, options) // CHARS_PER_TOKEN
    if role == "critic":
        draws = getattr(options, "samples", 1)
        requests = samples * draws
        basis = f"{samples} alignment samples" + (f", {draws} answers each (critic.samples)" if draws > 1 else "")
        prompt_tokens += CRITIC_IMAGES * image_tokens(options.image_detail)
    else:
        repairs = getattr(options, "repair_attempts", 0)
        requests = samples * (1 + repairs)
        basis = (
            f"{samples} alignment samples, up to {1 + repairs} answers each with "
            f"repair_attempts = {repairs}"
        )
        # The critique inside the prompt is a critic answer, bounded by the critic's max_tokens;
        # the judge's own max_tokens stands in for it (the judge does not know the critic's).
        prompt_tokens += options.max_tokens
    each = cost_usd(options.prices, options.model, prompt_tokens, options.max_tokens)
    return SpendingEstimate(
        requests=requests,
        basis=basis,
        prompt_tokens=prompt_tokens,
        completion_tokens=options.max_tokens,
        cost_usd=None if each is None else requests * each,
    )


def _usd(value: float) -> str:
    return f"${value:.2f}" if value >= 0.01 else f"${value:.2g}"


class RequestFailed(Exception):
    """A request that could not be answered after its attempts; the message says why."""

    def __init__(self, message: str, attempts: int, errors: list[str]) -> None:
        super().__init__(redact(message))
        self.attempts = attempts
        self.errors = [redact(e) for e in errors]


@dataclass
class _Answer:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    attempts: int = 1
    errors: list[str] = field(default_factory=list)


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


def _chain_texts(exc: BaseException) -> list[str]:
    """``Type: message`` of ``exc`` and of every exception chained to it (cause or context,
    as a traceback prints them), notes included."""
    texts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        notes = getattr(current, "__notes__", None) or []
        texts.append(" ".join([f"{type(current).__name__}: {current}", *map(str, notes)]))
        current = current.__cause__ or current.__context__
    return texts


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


def _run_sync(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from synchronous code, also when this thread already runs
    an event loop (a notebook): then in a fresh thread with its own loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(factory()))
        except BaseException as exc:  # handed back to the caller's thread below
            error.append(exc)

    thread = threading.Thread(target=target, name="lvlmva-openai")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


class _OpenAIBackend:
    """What the critic and the judge share: client, retries, cache, usage, transcripts."""

    role: ClassVar[str] = ""

    def __init__(self, options: OpenAIOptions) -> None:
        self.options = options
        self._templates = TemplateBook(self.role, "openai", options.family, options.template)
        self._key = ""

    # -- secrets ---------------------------------------------------------------------------------
    def _read_key(self) -> tuple[str, str | None]:
        """``(key, problem)``: the key in the variable named by ``api_key_env``, stripped of
        surrounding whitespace, and what makes it unusable (``None`` when nothing does). Both
        the value as read and the stripped key are registered as secrets before anything else
        is done with them; a problem names the variable, never the value."""
        name, role = self.options.api_key_env, self.role
        if not name:
            return NO_KEY, None
        raw = os.environ.get(name, "")
        register_secret(raw)
        key = raw.strip()
        register_secret(key)
        if not key:
            return key, (
                f"the environment variable {name} named by {role}.api_key_env is not set or "
                f'empty; export it, or set {role}.api_key_env = "" for a server that needs no key'
            )
        if not _KEY_CHARS.match(key):
            return key, (
                f"the environment variable {name} named by {role}.api_key_env holds whitespace, "
                "control or non-ASCII characters inside the key (two lines, or a key pasted with "
                f"text around it); export {name} again with the key alone"
            )
        return key, None

    def _api_key(self) -> str:
        key, problem = self._read_key()
        if problem is not None:
            raise RuntimeError(f"{self.role} plugin 'openai': {problem}")
        return key

    def _secret_free(self, call: Callable[[], T]) -> T:
        """``call()``, and an exception out of it whose text (or that of an exception chained
        to it) holds a registered secret raised again as a RuntimeError with the texts
        redacted, and without the chain that held it."""
        try:
            return call()
        except Exception as exc:
            texts = _chain_texts(exc)
            if all(redact(text) == text for text in texts):
                raise
            message = "; from ".join(redact(text) for text in texts)
        # raised outside the except block, so that the original is not its __context__ either
        raise RuntimeError(f"{self.role} plugin 'openai': {message}")

    # -- before the run --------------------------------------------------------------------------
    def preflight(self, samples: int) -> list[str]:
        """What would stop this stage, found before any work: an unset key variable or a key
        with whitespace or control characters inside it, a template that does not load, and a
        request or cost estimate past ``max_requests`` / ``max_cost_usd`` for ``samples``
        alignment samples."""
        who, role = f"{self.role} 'openai'", self.role
        problems = []
        _, problem = self._read_key()
        if problem is not None:
            problems.append(f"{who}: {problem}")
        try:
            estimate = estimate_spending(role, self.options, samples)
        except TemplateError as exc:
            return [*problems, f"{who}: {exc}"]
        limit = self.options.max_requests
        if limit is not None and estimate.requests > limit:
            problems.append(
                f"{who}: this run may send up to {estimate.requests} requests ({estimate.basis}), "
                f"more than {role}.max_requests = {limit}"
            )
        budget = self.options.max_cost_usd
        if budget is not None and estimate.cost_usd is None:
            problems.append(
                f"{who}: {role}.max_cost_usd is set but {role}.prices has no price for model "
                f"{self.options.model!r}; add the model to {role}.prices "
                "({prompt_per_1k = ..., completion_per_1k = ...}) or unset max_cost_usd"
            )
        elif budget is not None and estimate.cost_usd > budget:
            problems.append(
                f"{who}: estimated cost up to {_usd(estimate.cost_usd)} ({estimate.requests} "
                f"requests of {self.options.model}, about {estimate.prompt_tokens} prompt and "
                f"{estimate.completion_tokens} completion tokens each), more than "
                f"{role}.max_cost_usd = {budget:g}"
            )
        return problems

    def _log(self, ctx: RunContext, record: dict[str, Any]) -> None:
        """One transcript line, every text in it redacted."""
        ctx.log_jsonl("transcripts.jsonl", redact_json(record))

    # -- templates ---------------------------------------------------------------------------------
    def _template(self, family: str) -> PromptTemplate:
        return self._templates.get(family)

    def _open_cache(self, ctx: RunContext) -> ResponseCache | None:
        return open_response_cache(self.options.cache, self.options.cache_dir, ctx.cache_dir)

    def _params(self, ctx: RunContext) -> dict[str, Any]:
        params: dict[str, Any] = {
            "temperature": self.options.temperature,
            "max_tokens": self.options.max_tokens,
        }
        if self.options.send_seed:
            params["seed"] = ctx.seed
        return params

    def _cost(self, answer: _Answer) -> float:
        cost = cost_usd(
            self.options.prices, self.options.model, answer.prompt_tokens, answer.completion_tokens
        )
        return 0.0 if cost is None else cost

    # -- transport -------------------------------------------------------------------------------
    @property
    def _address(self) -> str:
        """The server requests go to, as failure texts name it (credentials and query left
        out: ``$OPENAI_BASE_URL`` is not checked like the option is)."""
        url = self.options.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        try:
            parts = urlsplit(url)
        except ValueError:
            parts = None
        if parts is None or not parts.scheme or not parts.netloc:
            return "$OPENAI_BASE_URL (not a URL)"
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"

    def _backoff(self, retry: int, rng: random.Random) -> float:
        base = min(self.options.backoff_max_s, self.options.backoff_initial_s * (2.0**retry))
        return base * (1.0 - self.options.jitter * rng.random())

    async def _complete(
        self,
        client: Any,
        semaphore: asyncio.Semaphore,
        messages: list[dict[str, Any]],
        params: dict[str, Any],
        extra: dict[str, Any],
        rng: random.Random,
    ) -> _Answer:
        """One chat completion with retries on transient failures; raises RequestFailed.

        Each attempt's error, with its details, goes into ``errors`` (the transcript); the
        failure names only the last cause and the server, so that equal causes read alike."""
        import openai

        errors: list[str] = []
        cause = ""
        for attempt in range(1, self.options.max_attempts + 1):
            wait: float | None = None
            try:
                async with semaphore:
                    response = await client.chat.completions.create(
                        model=self.options.model,
                        messages=messages,
                        **params,
                        **extra,
                        extra_body=self.options.extra_body or None,
                    )
            except openai.APITimeoutError:
                cause = f"timed out after {self.options.timeout_s:g} s"
                errors.append(f"attempt {attempt}: {cause}")
            except openai.APIConnectionError as exc:
                refused, reason = _connection_failure(exc)
                cause = "connection refused" if refused else f"connection error ({redact(reason)})"
                errors.append(
                    f"attempt {attempt}: connection error: {redact(reason)}"
                    + ("; connection refused" if refused else "")
                )
            except openai.APIStatusError as exc:
                status = exc.status_code
                message = redact(_server_message(exc))
                errors.append(f"attempt {attempt}: HTTP {status}: {message}")
                if status == 429 or status == 408 or status >= 500:
                    cause = "HTTP 429 (rate limited)" if status == 429 else f"HTTP {status}"
                    wait = retry_after_seconds(getattr(exc.response, "headers", None))
                else:
                    # 400, 401, 403, 404, ...: a setting to fix, which no retry would change.
                    hint = ""
                    if status == 400 and "response_format" in extra:
                        hint = (
                            " (if the server does not support structured output, set "
                            'judge.response_format = "json_object" or "none")'
                        )
                    raise RequestFailed(
                        f"HTTP {status}: {message} at {self._address}{hint}", attempt, errors
                    ) from None
            except openai.APIResponseValidationError as exc:
                cause = "unreadable response"
                errors.append(f"attempt {attempt}: unreadable response: {redact(str(exc))}")
            except ValueError as exc:
                # A body cut short fails JSON decoding inside the client.
                cause = "unreadable response body"
                errors.append(f"attempt {attempt}: unreadable response body: {redact(str(exc))}")
            else:
                choice = response.choices[0] if response.choices else None
                content = choice.message.content if choice is not None else None
                usage = response.usage
                answer = _Answer(
                    # a server that echoes the key into an answer: it reaches no cache or file
                    text=redact(content or ""),
                    prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                    completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
                    finish_reason=None if choice is None else choice.finish_reason,
                    attempts=attempt,
                    errors=errors,
                )
                return answer
            if attempt < self.options.max_attempts:
                # A server may ask for any wait; backoff_max_s bounds how long a run stalls.
                delay = (
                    min(wait, self.options.backoff_max_s)
                    if wait is not None
                    else self._backoff(attempt - 1, rng)
                )
                await asyncio.sleep(delay)
        raise RequestFailed(f"{cause} at {self._address}", self.options.max_attempts, errors)

    def _client(self) -> Any:
        import openai

        return openai.AsyncOpenAI(
            api_key=self._key,
            base_url=self.options.base_url,
            timeout=self.options.timeout_s,
            max_retries=0,  # retries are ours: counted, logged, and honouring Retry-After
        )

    async def _answer_all(
        self, items: Sequence[Any], answer_one: Any, ctx: RunContext, role: str
    ) -> list[Any]:
        """Answer every item with ``answer_one(client, semaphore, cache, item, ctx)``: one
        client, one cache connection and at most ``concurrency`` requests in flight."""
        cache = self._open_cache(ctx)
        semaphore = asyncio.Semaphore(self.options.concurrency)
        try:
            async with self._client() as client:
                jobs = [
                    (lambda item=item: answer_one(client, semaphore, cache, item, ctx))
                    for item in items
                ]
                return await self._gather(jobs, ctx, role)
        finally:
            if cache is not None:
                cache.close()

    async def _gather(
        self, jobs: Sequence[Callable[[], Awaitable[T]]], ctx: RunContext, label: str
    ) -> list[T]:
        if not ctx.progress:
            return list(await asyncio.gather(*(job() for job in jobs)))
        from rich.progress import Progress

        with Progress(transient=True) as progress:
            task = progress.add_task(f"{label} ({self.options.model})", total=len(jobs))

            async def tracked(job: Callable[[], Awaitable[T]]) -> T:
                try:
                    return await job()
                finally:
                    progress.advance(task)

            return list(await asyncio.gather(*(tracked(job) for job in jobs)))

    def _rng(self, ctx: RunContext, sample_id: int) -> random.Random:
        # Jitter only; seeded per sample so that runs are repeatable.
        return random.Random(f"{ctx.seed}:{self.role}:{sample_id}")


class OpenAICritic(_OpenAIBackend):
    """LVLM critic through an OpenAI-compatible server (OpenAI, vLLM, Ollama, llama.cpp)."""

    class Options(OpenAIOptions):
        """Settings of the OpenAI-compatible critic."""

        samples: int = Field(
            1,
            ge=1,
            le=15,
            description="Answers asked per alignment sample. Above 1 (an odd number, so that a majority "
            "exists) the judge reads each answer, the verdict per colour is the majority, and each sample "
            "gets an uncertainty (the share of disagreeing votes) that `lvlmva review` orders by; needs "
            "temperature > 0. Each answer is cached under its own index.",
        )

        @field_validator("samples")
        @classmethod
        def _samples_need_sampling(cls, samples: int, info: ValidationInfo) -> int:
            # a field validator (samples comes after temperature): its error shows this value
            # only, not the whole section
            if samples > 1 and samples % 2 == 0:
                raise ValueError(f"samples = {samples}: use an odd number, so that every colour has a majority")
            if samples > 1 and info.data.get("temperature", 0.0) == 0:
                raise ValueError(f"samples = {samples} needs temperature > 0: at temperature 0 the answers would all be the same")
            return samples

    needs_true_masks: ClassVar[bool] = False
    role: ClassVar[str] = "critic"

    def critique(self, requests: Sequence[CritiqueRequest], ctx: RunContext) -> list[Critique]:
        """One Critique per request, in order; unanswerable requests carry ``failure``."""
        if not requests:
            return []
        for request in requests:
            self._template(request.family)  # template errors surface before any request is sent
        return self._secret_free(lambda: self._critique_with_key(requests, ctx))

    def _critique_with_key(
        self, requests: Sequence[CritiqueRequest], ctx: RunContext
    ) -> list[Critique]:
        self._key = self._api_key()
        return _run_sync(lambda: self._critique_all(requests, ctx))

    async def _critique_all(
        self, requests: Sequence[CritiqueRequest], ctx: RunContext
    ) -> list[Critique]:
        return await self._answer_all(requests, self._critique_one, ctx, "critic")

    async def _critique_one(
        self,
        client: Any,
        semaphore: asyncio.Semaphore,
        cache: ResponseCache | None,
        request: CritiqueRequest,
        ctx: RunContext,
    ) -> Critique:
        template = self._template(request.family)
        prompt = render_critic_prompt(template, request)
        images = request.rendered.images
        hashes = [sha256_hex(png) for png in images]
        params = self._params(ctx)
        draw = request.draw
        if draw and "seed" in params:
            # another answer of the same sample: a server that honours seeds must not repeat the first
            params["seed"] = int.from_bytes(hashlib.sha256(f"{ctx.seed}:draw:{draw}".encode()).digest()[:4], "little")
        detail = self.options.image_detail
        key = ResponseCache.key(
            backend="openai",
            role="critic",
            model=self.options.model,
            template_version=template.version,
            images=hashes,
            prompt=prompt,
            # the first answer keeps the key it always had; each further one is cached by its index
            params={**params, "image_detail": detail, "extra_body": self.options.extra_body, **({"draw": draw} if draw else {})},
        )
        record: dict[str, Any] = {
            "stage": "critic",
            "backend": "openai",
            "model": self.options.model,
            "sample_id": request.sample_id,
            **({"draw": request.draw} if request.draw else {}),
            "label": request.label,
            "family": template.family,
            "template_version": template.version,
            "prompt": prompt,
            "images": [
                {"sha256": h, "file": f}
                for h, f in zip(hashes, request.rendered.files or ("",) * len(hashes), strict=False)
            ],
            "colors": list(request.colors),
        }
        started = time.perf_counter()
        common = {"sample_id": request.sample_id, "colors": request.colors, "model": self.options.model,
                  "family": request.family, "label": request.label, "draw": request.draw}  # fmt: skip
        cached = None if (cache is None or ctx.refresh) else cache.get(key)
        if cached is not None:
            record.update(answer=cached, cache_hit=True, attempts=0, latency_s=time.perf_counter() - started,
                          failure=None, usage=Usage(cache_hits=1).to_state())  # fmt: skip
            self._log(ctx, record)
            return Critique(text=redact(cached), usage=Usage(cache_hits=1), **common)

        content: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
        for png in images:
            content.append(
                {"type": "image_url", "image_url": {"url": _data_url(png), "detail": detail}}
            )
        messages = [{"role": "user", "content": content}]
        try:
            answer = await self._complete(
                client, semaphore, messages, params, {}, self._rng(ctx, request.sample_id)
            )
        except RequestFailed as exc:
            usage = Usage(requests=exc.attempts)
            record.update(answer=None, cache_hit=False, attempts=exc.attempts, errors=exc.errors,
                          latency_s=time.perf_counter() - started, failure=str(exc), retryable=True,
                          usage=usage.to_state())  # fmt: skip
            self._log(ctx, record)
            return Critique(text=None, failure=str(exc), usage=usage, retryable=True, **common)

        usage = Usage(
            answer.prompt_tokens, answer.completion_tokens, self._cost(answer), answer.attempts, 0
        )
        failure = None
        if answer.finish_reason == "length":
            # Half a discussion may lack the last clusters: not an answer to keep or cache. (An
            # empty one is a reasoning model that spent max_tokens on thinking.)
            failure = (
                f"critic answer cut off at max_tokens = {self.options.max_tokens}; "
                "raise critic.max_tokens"
            )
        elif not answer.text.strip():
            failure = f"critic returned an empty answer (finish_reason={answer.finish_reason})"
        elif cache is not None:
            cache.put(key, answer.text, {"model": self.options.model, "prompt_tokens": answer.prompt_tokens,
                                         "completion_tokens": answer.completion_tokens})  # fmt: skip
        record.update(answer=answer.text, cache_hit=False, attempts=answer.attempts, errors=answer.errors,
                      finish_reason=answer.finish_reason, latency_s=time.perf_counter() - started,
                      failure=failure, retryable=False, usage=usage.to_state())  # fmt: skip
        self._log(ctx, record)
        if failure is not None:
            return Critique(text=None, failure=failure, usage=usage, **common)
        return Critique(text=answer.text, usage=usage, **common)


class OpenAIJudge(_OpenAIBackend):
    """LLM judge through an OpenAI-compatible server: validated JSON verdicts, one repair retry."""

    class Options(OpenAIOptions):
        """Settings of the OpenAI-compatible judge."""

        model: str = Field(
            "gpt-4o-mini",
            min_length=1,
            description="Model name as the server knows it (gpt-4o-mini, Qwen/Qwen2.5-7B-Instruct, ...).",
        )
        max_tokens: int = Field(512, ge=1, description="Most tokens the model may answer with.")
        response_format: Literal["json_schema", "json_object", "none"] = Field(
            "json_schema",
            description='Structured output to ask for: "json_schema" (the exact verdict schema), "json_object" (any JSON), "none" (plain text; the answer is still validated).',
        )
        schema_strict: bool = Field(
            True,
            description="Ask the server to enforce the JSON schema strictly (OpenAI's strict mode).",
        )
        repair_attempts: int = Field(
            1,
            ge=0,
            description="Times an invalid answer is sent back with the validation error before the sample is recorded as failed.",
        )

    role: ClassVar[str] = "judge"

    def judge(self, critiques: Sequence[Critique], ctx: RunContext) -> list[Verdicts]:
        """One Verdicts per critique, in order; invalid answers end as recorded failures."""
        if not critiques:
            return []
        for critique in critiques:
            if critique.text is not None:
                self._template(critique.family)
        return self._secret_free(lambda: self._judge_with_key(critiques, ctx))

    def _judge_with_key(self, critiques: Sequence[Critique], ctx: RunContext) -> list[Verdicts]:
        if any(c.text is not None for c in critiques):
            self._key = self._api_key()
        return _run_sync(lambda: self._judge_all(critiques, ctx))

    async def _judge_all(self, critiques: Sequence[Critique], ctx: RunContext) -> list[Verdicts]:
        if all(c.text is None for c in critiques):
            return [self._failed_critique(c, ctx) for c in critiques]
        return await self._answer_all(critiques, self._judge_one, ctx, "judge")

    def _failed_critique(self, critique: Critique, ctx: RunContext) -> Verdicts:
        # Not retryable: asking the judge again cannot help; the critic's failure is the one
        # a re-run must fix.
        reason = redact(f"no critique to judge: {critique.failure}")
        self._log(ctx, {"stage": "judge", "backend": "openai", "model": self.options.model,
                        "sample_id": critique.sample_id, "failure": reason, "attempts": 0,
                        "cache_hit": False, "retryable": False})  # fmt: skip
        return Verdicts(critique.sample_id, critique.colors, None, failure=reason, attempts=0)

    def _response_format(self, colors: Sequence[str]) -> dict[str, Any]:
        kind = self.options.response_format
        if kind == "none":
            return {}
        if kind == "json_object":
            return {"response_format": {"type": "json_object"}}
        return {
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "cluster_verdicts",
                    "schema": judge_json_schema(colors),
                    "strict": self.options.schema_strict,
                },
            }
        }

    async def _judge_one(
        self,
        client: Any,
        semaphore: asyncio.Semaphore,
        cache: ResponseCache | None,
        critique: Critique,
        ctx: RunContext,
    ) -> Verdicts:
        if critique.text is None:
            return self._failed_critique(critique, ctx)
        template = self._template(critique.family)
        instructions, user = render_judge_prompt(template, critique)
        colors = critique.colors
        params = self._params(ctx)
        extra = self._response_format(colors)
        key = ResponseCache.key(
            backend="openai",
            role="judge",
            model=self.options.model,
            template_version=template.version,
            prompt=[instructions, user],
            params={**params, **extra, "extra_body": self.options.extra_body},
        )
        record: dict[str, Any] = {
            "stage": "judge",
            "backend": "openai",
            "model": self.options.model,
            "sample_id": critique.sample_id,
            "family": template.family,
            "template_version": template.version,
            "prompt": {"system": instructions, "user": user},
            "colors": list(colors),
        }
        started = time.perf_counter()
        cached = None if (cache is None or ctx.refresh) else cache.get(key)
        if cached is not None:
            try:
                parsed = parse_judge_answer(cached, colors)
            except JudgeAnswerError:
                cached = None  # stored under an older validator: ask again
            else:
                usage = Usage(cache_hits=1)
                record.update(answer=cached, verdicts=_verdict_map(colors, parsed.relevant),
                              ignored_colors=list(parsed.ignored), cache_hit=True, attempts=0,
                              answers=0, latency_s=time.perf_counter() - started, failure=None,
                              usage=usage.to_state())  # fmt: skip
                self._log(ctx, record)
                return Verdicts(critique.sample_id, colors, parsed.relevant, attempts=0,
                                usage=usage, ignored_colors=parsed.ignored)  # fmt: skip

        messages: list[dict[str, Any]] = [
            {"role": "system", "content": instructions},
            {"role": "user", "content": user},
        ]
        rng = self._rng(ctx, critique.sample_id)
        usage = Usage()
        http_attempts = 0
        answers: list[str] = []
        problems: list[str] = []
        errors: list[str] = []
        parsed: ParsedVerdicts | None = None
        failure: str | None = None
        retryable = False
        for round_ in range(self.options.repair_attempts + 1):
            try:
                answer = await self._complete(client, semaphore, messages, params, extra, rng)
            except RequestFailed as exc:
                http_attempts += exc.attempts
                errors.extend(exc.errors)
                usage = usage + Usage(requests=exc.attempts)
                failure, retryable = str(exc), True
                break
            http_attempts += answer.attempts
            errors.extend(answer.errors)
            usage = usage + Usage(
                answer.prompt_tokens, answer.completion_tokens, self._cost(answer), answer.attempts
            )
            answers.append(answer.text)
            try:
                parsed = parse_judge_answer(answer.text, colors)
            except JudgeAnswerError as exc:
                problems.append(str(exc))
                if round_ == self.options.repair_attempts:
                    failure = f"invalid judge answer after {round_ + 1} answer(s): {exc}"
                    if answer.finish_reason == "length":
                        failure += (
                            f" (the answer was cut off at max_tokens = {self.options.max_tokens};"
                            " raise judge.max_tokens)"
                        )
                    break
                messages = [
                    *messages,
                    {"role": "assistant", "content": answer.text},
                    {
                        "role": "user",
                        "content": f"Your answer could not be used: {exc} Please answer again.",
                    },
                ]
                continue
            if cache is not None:
                # Only an answer that parsed; stored under the first prompt's key, repaired or
                # not, so that a re-run gets the valid answer at once.
                cache.put(key, answer.text, {"model": self.options.model, "prompt_tokens": answer.prompt_tokens,
                                             "completion_tokens": answer.completion_tokens})  # fmt: skip
            break

        record.update(
            answer=answers[-1] if answers else None,
            answers=answers,
            validation_errors=problems,
            verdicts=None if parsed is None else _verdict_map(colors, parsed.relevant),
            ignored_colors=[] if parsed is None else list(parsed.ignored),
            cache_hit=False,
            attempts=http_attempts,
            errors=errors,
            latency_s=time.perf_counter() - started,
            failure=failure,
            retryable=retryable,
            usage=usage.to_state(),
        )
        self._log(ctx, record)
        if parsed is None:
            return Verdicts(
                critique.sample_id,
                colors,
                None,
                failure=failure,
                attempts=max(1, len(answers)),
                usage=usage,
                retryable=retryable,
            )
        return Verdicts(critique.sample_id, colors, parsed.relevant, attempts=len(answers),
                        usage=usage, ignored_colors=parsed.ignored)  # fmt: skip


def _verdict_map(colors: Sequence[str], relevant: Sequence[bool]) -> dict[str, str]:
    return {c: ("yes" if r else "no") for c, r in zip(colors, relevant, strict=True)}
