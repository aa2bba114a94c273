"""Critic and Judge through any OpenAI-compatible chat-completions server.

Works with OpenAI itself and with local servers that speak the same protocol (vLLM, Ollama,
llama.cpp, LM Studio). Requests run concurrently up to ``concurrency``; transient failures
(429, 5xx, timeouts, dropped connections, unreadable bodies) are retried with exponential
backoff and jitter, honouring ``Retry-After``. Answers go into a shared SQLite response cache,
so a re-run never pays twice. Every exchange is written to ``transcripts.jsonl``.

The API key is read from the environment variable named by ``api_key_env`` and kept in memory
only: it never enters a cache key, a transcript, a failure message or a settings file.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import Field

from lvlmva.protocols import PluginOptions, RunContext
from lvlmva.records import Critique, CritiqueRequest, Usage, Verdicts

from .cache import ResponseCache, open_response_cache, sha256_hex
from .prompts import PromptTemplate, TemplateBook, render_critic_prompt, render_judge_prompt
from .verdict_schema import JudgeAnswerError, judge_json_schema, parse_judge_answer

__all__ = [
    "DEFAULT_PRICES",
    "ModelPrice",
    "OpenAIOptions",
    "OpenAICritic",
    "OpenAIJudge",
    "RequestFailed",
    "cost_usd",
    "retry_after_seconds",
]

T = TypeVar("T")

#: placeholder key for servers that need none (``api_key_env = ""``)
NO_KEY = "not-needed"


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


class OpenAIOptions(PluginOptions):
    """Settings shared by the OpenAI-compatible critic and judge."""

    model: str = Field(
        "gpt-4o",
        min_length=1,
        description="Model name as the server knows it (gpt-4o, Qwen/Qwen2.5-VL-7B-Instruct, llava:13b, ...).",
    )
    base_url: str | None = Field(
        None,
        description="Server URL ending in /v1 (vLLM: http://127.0.0.1:8000/v1, Ollama: http://127.0.0.1:11434/v1). None: OpenAI (or $OPENAI_BASE_URL). Never part of the cache key.",
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description='Name of the environment variable holding the API key (never the key itself). "" for local servers that need no key.',
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
        description="Longest wait between retries, unless the server's Retry-After asks for more.",
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


class RequestFailed(Exception):
    """A request that could not be answered after its attempts; the message says why."""

    def __init__(self, message: str, attempts: int, errors: list[str]) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.errors = errors


@dataclass
class _Answer:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    attempts: int = 1
    errors: list[str] = field(default_factory=list)


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
    def _api_key(self) -> str:
        name = self.options.api_key_env
        if not name:
            return NO_KEY
        key = os.environ.get(name)
        if not key:
            raise RuntimeError(
                f"{self.role} plugin 'openai': the environment variable {name} (api_key_env) is not "
                f'set; export it, or set {self.role}.api_key_env = "" for a server that needs no key'
            )
        return key

    def _redact(self, text: str) -> str:
        key = self._key
        if key and key != NO_KEY and key in text:
            text = text.replace(key, "***")
        return text

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
        """One chat completion with retries on transient failures; raises RequestFailed."""
        import openai

        errors: list[str] = []
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
                errors.append(f"attempt {attempt}: timed out after {self.options.timeout_s:g} s")
            except openai.APIConnectionError as exc:
                errors.append(f"attempt {attempt}: connection error: {self._redact(str(exc))}")
            except openai.APIStatusError as exc:
                status = exc.status_code
                message = self._redact(f"HTTP {status}: {exc.message}")
                if status == 429 or status == 408 or status >= 500:
                    errors.append(f"attempt {attempt}: {message}")
                    wait = retry_after_seconds(getattr(exc.response, "headers", None))
                else:
                    errors.append(f"attempt {attempt}: {message}")
                    hint = ""
                    if status == 400 and "response_format" in extra:
                        hint = (
                            " (if the server does not support structured output, set "
                            'judge.response_format = "json_object" or "none")'
                        )
                    raise RequestFailed(f"{message}{hint}; not retried", attempt, errors) from None
            except openai.APIResponseValidationError as exc:
                errors.append(f"attempt {attempt}: unreadable response: {self._redact(str(exc))}")
            except ValueError as exc:
                # A body cut short fails JSON decoding inside the client.
                errors.append(
                    f"attempt {attempt}: unreadable response body: {self._redact(str(exc))}"
                )
            else:
                choice = response.choices[0] if response.choices else None
                content = choice.message.content if choice is not None else None
                usage = response.usage
                answer = _Answer(
                    text=content or "",
                    prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                    completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
                    finish_reason=None if choice is None else choice.finish_reason,
                    attempts=attempt,
                    errors=errors,
                )
                return answer
            if attempt < self.options.max_attempts:
                delay = wait if wait is not None else self._backoff(attempt - 1, rng)
                await asyncio.sleep(delay)
        raise RequestFailed(
            f"no answer after {self.options.max_attempts} attempts (last: {errors[-1]})",
            self.options.max_attempts,
            errors,
        )

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

    accepts_images: ClassVar[bool] = True
    needs_true_masks: ClassVar[bool] = False
    role: ClassVar[str] = "critic"

    def critique(self, requests: Sequence[CritiqueRequest], ctx: RunContext) -> list[Critique]:
        """One Critique per request, in order; unanswerable requests carry ``failure``."""
        if not requests:
            return []
        for request in requests:
            self._template(request.family)  # template errors surface before any request is sent
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
        detail = self.options.image_detail
        key = ResponseCache.key(
            backend="openai",
            role="critic",
            model=self.options.model,
            template_version=template.version,
            images=hashes,
            prompt=prompt,
            params={**params, "image_detail": detail, "extra_body": self.options.extra_body},
        )
        record: dict[str, Any] = {
            "stage": "critic",
            "backend": "openai",
            "model": self.options.model,
            "sample_id": request.sample_id,
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
                  "family": request.family, "label": request.label}  # fmt: skip
        cached = None if (cache is None or ctx.refresh) else cache.get(key)
        if cached is not None:
            record.update(answer=cached, cache_hit=True, attempts=0, latency_s=time.perf_counter() - started,
                          failure=None, usage=Usage(cache_hits=1).to_state())  # fmt: skip
            ctx.log_jsonl("transcripts.jsonl", record)
            return Critique(text=cached, usage=Usage(cache_hits=1), **common)

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
                          latency_s=time.perf_counter() - started, failure=str(exc), usage=usage.to_state())  # fmt: skip
            ctx.log_jsonl("transcripts.jsonl", record)
            return Critique(
                text=None, failure=f"critic request failed: {exc}", usage=usage, **common
            )

        usage = Usage(
            answer.prompt_tokens, answer.completion_tokens, self._cost(answer), answer.attempts, 0
        )
        failure = None
        if not answer.text.strip():
            failure = f"critic returned an empty answer (finish_reason={answer.finish_reason})"
        elif cache is not None:
            cache.put(key, answer.text, {"model": self.options.model, "prompt_tokens": answer.prompt_tokens,
                                         "completion_tokens": answer.completion_tokens})  # fmt: skip
        record.update(answer=answer.text, cache_hit=False, attempts=answer.attempts, errors=answer.errors,
                      finish_reason=answer.finish_reason, latency_s=time.perf_counter() - started,
                      failure=failure, usage=usage.to_state())  # fmt: skip
        ctx.log_jsonl("transcripts.jsonl", record)
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
        if any(c.text is not None for c in critiques):
            self._key = self._api_key()
        return _run_sync(lambda: self._judge_all(critiques, ctx))

    async def _judge_all(self, critiques: Sequence[Critique], ctx: RunContext) -> list[Verdicts]:
        if all(c.text is None for c in critiques):
            return [self._failed_critique(c, ctx) for c in critiques]
        return await self._answer_all(critiques, self._judge_one, ctx, "judge")

    def _failed_critique(self, critique: Critique, ctx: RunContext) -> Verdicts:
        reason = f"no critique to judge: {critique.failure}"
        ctx.log_jsonl("transcripts.jsonl", {"stage": "judge", "backend": "openai", "model": self.options.model,
                                            "sample_id": critique.sample_id, "failure": reason, "attempts": 0,
                                            "cache_hit": False})  # fmt: skip
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
                relevant = parse_judge_answer(cached, colors)
            except JudgeAnswerError:
                cached = None  # stored under an older validator: ask again
            else:
                usage = Usage(cache_hits=1)
                record.update(answer=cached, verdicts=_verdict_map(colors, relevant), cache_hit=True,
                              attempts=0, answers=0, latency_s=time.perf_counter() - started,
                              failure=None, usage=usage.to_state())  # fmt: skip
                ctx.log_jsonl("transcripts.jsonl", record)
                return Verdicts(critique.sample_id, colors, relevant, attempts=0, usage=usage)

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
        relevant: tuple[bool, ...] | None = None
        failure: str | None = None
        for round_ in range(self.options.repair_attempts + 1):
            try:
                answer = await self._complete(client, semaphore, messages, params, extra, rng)
            except RequestFailed as exc:
                http_attempts += exc.attempts
                errors.extend(exc.errors)
                usage = usage + Usage(requests=exc.attempts)
                failure = f"judge request failed: {exc}"
                break
            http_attempts += answer.attempts
            errors.extend(answer.errors)
            usage = usage + Usage(
                answer.prompt_tokens, answer.completion_tokens, self._cost(answer), answer.attempts
            )
            answers.append(answer.text)
            try:
                relevant = parse_judge_answer(answer.text, colors)
            except JudgeAnswerError as exc:
                problems.append(str(exc))
                if round_ == self.options.repair_attempts:
                    failure = f"invalid judge answer after {round_ + 1} answer(s): {exc}"
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
                cache.put(key, answer.text, {"model": self.options.model, "prompt_tokens": answer.prompt_tokens,
                                             "completion_tokens": answer.completion_tokens})  # fmt: skip
            break

        record.update(
            answer=answers[-1] if answers else None,
            answers=answers,
            validation_errors=problems,
            verdicts=None if relevant is None else _verdict_map(colors, relevant),
            cache_hit=False,
            attempts=http_attempts,
            errors=errors,
            latency_s=time.perf_counter() - started,
            failure=failure,
            usage=usage.to_state(),
        )
        ctx.log_jsonl("transcripts.jsonl", record)
        if relevant is None:
            return Verdicts(
                critique.sample_id,
                colors,
                None,
                failure=failure,
                attempts=max(1, len(answers)),
                usage=usage,
            )
        return Verdicts(critique.sample_id, colors, relevant, attempts=len(answers), usage=usage)


def _verdict_map(colors: Sequence[str], relevant: Sequence[bool]) -> dict[str, str]:
    return {c: ("yes" if r else "no") for c, r in zip(colors, relevant, strict=True)}
