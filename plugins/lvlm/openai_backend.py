"""Critic and Judge through any OpenAI-compatible chat-completions server.

Works with OpenAI itself and with local servers that speak the same protocol (vLLM, Ollama,
llama.cpp, LM Studio). The flows (prompts, cache, checks, repair, transcripts, failure kinds) are
:mod:`.flow`'s; this module gives their options, the budget checks before a run, the API key,
and the transport: chat completions (:mod:`.openai_transport`) or, with ``api = "batch"``,
OpenAI's Batch API (:mod:`.batch_transport`), which asks the same questions under the same cache
keys at batch prices.

The API key is read from the environment variable named by ``api_key_env`` and kept in memory
only: it never enters a cache key, a transcript, a failure message or a settings file. Whitespace
around it (the CR of a line read from a CRLF ``.env`` file) is stripped; a key with whitespace,
control or non-ASCII characters inside it is refused before any work, naming the variable. The
key, as read and as stripped, is registered with :mod:`lvlmva.secrets` the moment it is read, and
every text this backend stores, returns or raises passes through its ``redact``: an HTTP library
that quotes the header in an error message, or a server that echoes it, leaves ``[redacted]``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import ConfigDict, Field, ValidationInfo, field_validator

from lvlmva.protocols import PluginOptions, RunContext
from lvlmva.secrets import register_secret
from lvlmva.templates import builtin_families

from .batch_transport import OpenAIBatchTransport
from .flow import (
    LvlmCritic,
    LvlmJudge,
    LvlmPlugin,
    RequestPlan,
    max_invalid_attempts_field,
    retry_invalid_field,
)
from .openai_transport import OpenAITransport, cost_usd, retry_after_seconds
from .prompts import PromptTemplate, TemplateError, load_template

__all__ = [
    "DEFAULT_PRICES",
    "ModelPrice",
    "OpenAIOptions",
    "OpenAICritic",
    "OpenAIJudge",
    "SpendingEstimate",
    "cost_usd",
    "estimate_spending",
    "image_tokens",
    "retry_after_seconds",
]

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

    api: Literal["chat", "batch"] = Field(
        "chat",
        description='How requests are sent: "chat" (chat completions, concurrently) or "batch" (OpenAI\'s Batch API: each round of requests as one batch job, polled until done, at batch prices; a run stopped while its batch is pending picks the same batch up again). Answers and cache keys are the same either way.',
        json_schema_extra={"fingerprint": False},
    )
    batch_poll_s: float = Field(
        30.0,
        gt=0,
        description='Seconds between two looks at a pending batch (api = "batch").',
        json_schema_extra={"fingerprint": False},
    )
    batch_completion_window: str = Field(
        "24h",
        min_length=1,
        description='The time a batch has to finish before it expires (api = "batch"; OpenAI accepts "24h"); requests an expired batch did not answer are asked again by the next run.',
        json_schema_extra={"fingerprint": False},
    )
    batch_price_factor: float = Field(
        0.5,
        ge=0,
        description='Cost of a batch request as a share of prices (api = "batch"; OpenAI\'s Batch API costs half its chat prices).',
        json_schema_extra={"fingerprint": False},  # like api: what answers cost, not what they are
    )

    max_invalid_attempts: int = max_invalid_attempts_field()
    retry_invalid: bool = retry_invalid_field()

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
    no entry for the model; at batch prices with ``api = "batch"``)."""

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
        basis = f"{samples} alignment samples" + (
            f", {draws} answers each (critic.samples)" if draws > 1 else ""
        )
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
    if each is not None and options.api == "batch":
        each *= options.batch_price_factor
    return SpendingEstimate(
        requests=requests,
        basis=basis,
        prompt_tokens=prompt_tokens,
        completion_tokens=options.max_tokens,
        cost_usd=None if each is None else requests * each,
    )


@dataclass(frozen=True)
class BatchRequestPlan(RequestPlan):
    """A plan whose requests go through OpenAI's Batch API (``batch_note`` says so)."""

    batch_note: str = ""

    def __str__(self) -> str:
        text = super().__str__()
        head, sep, rest = text.partition("; ")
        return f"{head}, {self.batch_note}{sep}{rest}"


def _usd(value: float) -> str:
    return f"${value:.2f}" if value >= 0.01 else f"${value:.2g}"


class _OpenAIPlugin(LvlmPlugin):
    """What the OpenAI-compatible critic and judge add to the flows: the API key, the budget
    checks before a run, and the transport."""

    backend: ClassVar[str] = "openai"
    options: OpenAIOptions

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
                f"{estimate.completion_tokens} completion tokens each{self._price_basis}), more than "
                f"{role}.max_cost_usd = {budget:g}"
            )
        return problems

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

    @property
    def token_limit(self) -> tuple[str, int]:
        return ("max_tokens", self.options.max_tokens)

    @property
    def _price_basis(self) -> str:
        o = self.options
        return (
            f", at batch prices: {o.batch_price_factor:g} x {self.role}.prices"
            if o.api == "batch"
            else ""
        )

    def transport(self, ctx: RunContext) -> OpenAITransport:
        """Chat completions, or OpenAI's Batch API (``api = "batch"``; pending batches are
        recorded in the response cache's folder, which outlives runs)."""
        if self.options.api == "batch":
            records = Path(self.options.cache_dir or ctx.cache_dir) / "batches"
            return OpenAIBatchTransport(
                self.options, self.role, self._address, self._api_key, records
            )
        return OpenAITransport(self.options, self.role, self._address, self._api_key)

    def plan(self, items: Sequence[Any], ctx: RunContext) -> RequestPlan:
        """The flow's plan; with ``api = "batch"`` it also says that the requests go as one
        batch and whether a batch an earlier run submitted holds them all."""
        plan = super().plan(items, ctx)
        if self.options.api != "batch" or not plan.requests:
            return plan
        transport = self.transport(ctx)
        assert isinstance(transport, OpenAIBatchTransport)
        with self._cache(ctx) as cache:
            asked = [job.chat for job in self._jobs(items, ctx, transport, cache) if job.reason]
        found = transport.pending(asked)  # type: ignore[arg-type]
        note = "as one batch of OpenAI's Batch API"
        if plan.repairs:
            note = "as batches of OpenAI's Batch API (one, and one per repair round)"
        note += f" at batch prices ({self.options.batch_price_factor:g} x {self.role}.prices)"
        if found is not None:
            note += (
                f"; all are in batch {found[1]['batch_id']}, submitted by an earlier run: this run "
                "waits for it instead of sending them again"
            )
        return BatchRequestPlan(
            **{f.name: getattr(plan, f.name) for f in fields(plan)}, batch_note=note
        )


class OpenAICritic(_OpenAIPlugin, LvlmCritic):
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
                raise ValueError(
                    f"samples = {samples}: use an odd number, so that every colour has a majority"
                )
            if samples > 1 and info.data.get("temperature", 0.0) == 0:
                raise ValueError(
                    f"samples = {samples} needs temperature > 0: at temperature 0 the answers would all be the same"
                )
            return samples

    needs_true_masks: ClassVar[bool] = False
    role: ClassVar[str] = "critic"


class OpenAIJudge(_OpenAIPlugin, LvlmJudge):
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
