"""Critic and Judge on a local Hugging Face model (``transformers``).

The Critic runs an image-text-to-text model (``AutoProcessor`` + ``AutoModelForImageTextToText``)
on the three rendered images of each sample and the critic prompt; the Judge runs a text-only
causal LM (``AutoTokenizer`` + ``AutoModelForCausalLM``) or an image-text-to-text model without
images. Both use the model's chat template, batched greedy generation with left padding, the
same prompt templates, answer validation and response cache as the OpenAI backend, and write
one transcript line per sample and attempt.

``model`` is a local folder or a Hugging Face model id; fetching a model id is left to
``from_pretrained`` (set ``local_files_only`` to forbid network access). The model is loaded
lazily, on the first answer that is not in the cache, so a fully cached re-run loads nothing.
transformers is imported inside functions: importing this module stays cheap.

A generation error (out of memory, a device fault) is a ``retryable`` failure: it says nothing
about the sample. An answer that is empty, cut off at ``max_new_tokens``, or a judge answer
still invalid after repair is a failure that is not retryable, and is never cached.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from lvlmva.plugins.lvlm.cache import ResponseCache, open_response_cache, sha256_hex
from lvlmva.plugins.lvlm.prompts import (
    PromptTemplate,
    TemplateBook,
    TemplateError,
    load_template,
    render_critic_prompt,
    render_judge_prompt,
)
from lvlmva.plugins.lvlm.verdict_schema import JudgeAnswerError, ParsedVerdicts, parse_judge_answer
from lvlmva.protocols import PluginOptions, RunContext
from lvlmva.records import Critique, CritiqueRequest, Usage, Verdicts
from lvlmva.secrets import redact, redact_json

__all__ = [
    "BACKEND",
    "TransformersOptions",
    "TransformersCriticOptions",
    "TransformersJudgeOptions",
    "LocalModel",
    "load_local_model",
    "GeneratedAnswer",
    "generate_batch",
    "resolve_dtype",
    "TransformersCritic",
    "TransformersJudge",
]

#: backend kind in cache keys and transcripts
BACKEND = "transformers"

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class TransformersOptions(PluginOptions):
    """Options shared by the transformers Critic and Judge."""

    model: str = Field(
        ...,
        min_length=1,
        description="Local model folder or Hugging Face model id (fetching an id is up to from_pretrained and the user).",
    )
    device: str = Field(
        "auto", description='"auto" (the run\'s device), "cpu", "cuda", "cuda:1", ...'
    )
    dtype: Dtype = Field(
        "auto",
        description='Weights and activations: "auto" = float32 on CPU, the checkpoint\'s dtype elsewhere; or "float32", "bfloat16", "float16".',
    )
    max_new_tokens: int = Field(
        512, ge=1, description="Most tokens generated per answer (greedy decoding)."
    )
    batch_size: int = Field(4, ge=1, description="Samples generated together (left-padded batch).")
    template: Path | None = Field(
        None,
        description="A user's prompt template file (TOML with version and text); None = the built-in one of the family.",
        json_schema_extra={"fingerprint": "content"},
    )
    family: str | None = Field(
        None,
        description="Template family; None = the family of each request or critique (the data set's).",
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code shipped with the checkpoint to run."
    )
    local_files_only: bool = Field(
        False, description="Never fetch model files; load only what is on disk."
    )
    cache: bool = Field(True, description="Read and write the shared response cache.")
    cache_dir: Path | None = Field(
        None,
        description="Folder of responses.sqlite; None = the run's user cache directory.",
        json_schema_extra={"fingerprint": False},
    )


class TransformersCriticOptions(TransformersOptions):
    """Options of the transformers Critic."""


class TransformersJudgeOptions(TransformersOptions):
    """Options of the transformers Judge."""

    max_new_tokens: int = Field(
        256, ge=1, description="Most tokens generated per answer (greedy decoding)."
    )
    repair_attempts: int = Field(
        1,
        ge=0,
        description="Times an invalid answer is sent back with the validation error before the sample is recorded as failed.",
    )
    system_role: bool = Field(
        True,
        description="Send the instructions as a system message; False puts them in front of the user message (for chat templates without a system role).",
    )


# -- model loading ---------------------------------------------------------------------------


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype | str:
    """The dtype to load weights in: a torch dtype, or ``"auto"`` (the checkpoint's own)."""
    if spec == "auto":
        # Half precision on CPU is slow or unsupported for many kernels.
        return torch.float32 if device.type == "cpu" else "auto"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec]


@dataclass
class LocalModel:
    """A loaded model with what turns chats into its inputs.

    ``preprocessor`` is the processor (image-text-to-text) or the tokenizer (causal LM);
    ``tokenizer`` is the tokenizer either way; ``accepts_images`` says which of the two it is.
    """

    name: str
    model: Any
    preprocessor: Any
    tokenizer: Any
    accepts_images: bool
    device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype


def load_local_model(
    name: str,
    *,
    device: torch.device,
    dtype: str = "auto",
    images: bool,
    trust_remote_code: bool = False,
    local_files_only: bool = False,
) -> LocalModel:
    """Load ``name`` for generation on ``device``.

    With ``images`` an image-text-to-text model and its processor are loaded. Without, a causal
    LM and its tokenizer are loaded when the checkpoint is one; otherwise an image-text-to-text
    model is loaded and used without images. Raises ``ValueError`` naming the model when it is
    neither.
    """
    import transformers
    from transformers.models.auto import modeling_auto

    common = {"trust_remote_code": trust_remote_code, "local_files_only": local_files_only}
    config = transformers.AutoConfig.from_pretrained(name, **common)
    auto_map = getattr(config, "auto_map", None) or {}
    is_vlm = (
        config.model_type in modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        or "AutoModelForImageTextToText" in auto_map
    )
    is_causal = (
        config.model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        or "AutoModelForCausalLM" in auto_map
    )
    use_vlm = images or not is_causal
    if use_vlm and not is_vlm:
        need = (
            "an image-text-to-text model"
            if images
            else "a causal LM or an image-text-to-text model"
        )
        raise ValueError(f"model {name!r} (model_type {config.model_type!r}) is not {need}")
    torch_dtype = resolve_dtype(dtype, device)
    if use_vlm:
        preprocessor = transformers.AutoProcessor.from_pretrained(name, **common)
        tokenizer = getattr(preprocessor, "tokenizer", preprocessor)
        model = transformers.AutoModelForImageTextToText.from_pretrained(
            name, dtype=torch_dtype, **common
        )
    else:
        tokenizer = preprocessor = transformers.AutoTokenizer.from_pretrained(name, **common)
        model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, **common)
    if getattr(preprocessor, "chat_template", None) is None and tokenizer.chat_template is None:
        raise ValueError(
            f"model {name!r} has no chat template; pick an instruction-tuned checkpoint"
        )
    # Batched generation appends new tokens on the right: prompts must be padded on the left.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    return LocalModel(name, model, preprocessor, tokenizer, use_vlm, device)


# -- generation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneratedAnswer:
    """One decoded answer and the tokens it took (prompt without padding, answer with eos);
    ``finished`` is False when ``max_new_tokens`` ran out before the end-of-sequence token."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finished: bool = True


def _chat_text(local: LocalModel, messages: list[dict[str, Any]]) -> str:
    if local.accepts_images:
        # Processors' chat templates expect list contents with typed items.
        messages = [
            {**m, "content": [{"type": "text", "text": m["content"]}]}
            if isinstance(m["content"], str)
            else m
            for m in messages
        ]
    return local.preprocessor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )


def _decode_png(data: bytes) -> Any:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def generate_batch(
    local: LocalModel,
    chats: Sequence[list[dict[str, Any]]],
    images: Sequence[Sequence[bytes]] | None,
    max_new_tokens: int,
) -> list[GeneratedAnswer]:
    """Greedy answers to ``chats`` (one chat per row, left-padded batch); ``images`` are the PNG
    bytes of each row's image entries, in order."""
    texts = [_chat_text(local, chat) for chat in chats]
    # The chat template already wrote bos and the role markers.
    kwargs: dict[str, Any] = {"padding": True, "return_tensors": "pt", "add_special_tokens": False}
    if images is not None and any(images):
        kwargs["images"] = [[_decode_png(png) for png in row] for row in images]
        batch = local.preprocessor(text=texts, **kwargs)
    else:
        batch = (local.tokenizer if not local.accepts_images else local.preprocessor)(
            text=texts, **kwargs
        )
    inputs = {
        k: (v.to(local.device, local.dtype) if v.is_floating_point() else v.to(local.device))
        for k, v in batch.items()
        if isinstance(v, torch.Tensor)
    }
    tok = local.tokenizer
    with torch.inference_mode():
        out = local.model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
    prompt_len = inputs["input_ids"].shape[1]
    new = out[:, prompt_len:].cpu()
    # Tokens after the first end-of-sequence are padding of rows that finished early.
    eos_ids = local.model.generation_config.eos_token_id
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [tok.eos_token_id])
    is_eos = torch.isin(new, torch.tensor(eos_ids, dtype=new.dtype))
    # The answer's tokens up to and including its first end-of-sequence token.
    completion = ((is_eos.cumsum(dim=1) - is_eos.long()) == 0).sum(dim=1)
    prompt_tokens = inputs["attention_mask"].sum(dim=1).cpu()
    # A finished row holds its end-of-sequence token: generation pads rows that end early.
    finished = is_eos.any(dim=1)
    answers = tok.batch_decode(new, skip_special_tokens=True)
    return [
        GeneratedAnswer(text.strip(), int(p), int(c), bool(f))
        for text, p, c, f in zip(
            answers, prompt_tokens.tolist(), completion.tolist(), finished.tolist(), strict=True
        )
    ]


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# -- the plugins -----------------------------------------------------------------------------


class _TransformersBackend:
    """What the Critic and the Judge share: options, templates, the cache and the model."""

    role: ClassVar[str]
    options: TransformersOptions

    def __init__(self, options: TransformersOptions) -> None:
        self.options = options
        self._local: LocalModel | None = None
        self._templates = TemplateBook(self.role, "transformers", options.family, options.template)

    def _template(self, family: str) -> PromptTemplate:
        return self._templates.get(family)

    def preflight(self, samples: int) -> list[str]:
        """Problems that would otherwise stop this stage only after the stages before it ran: a
        model folder that is not there, a CUDA device that is not there, a template that does
        not load. (Nothing is paid for, so there is no budget to check.)"""
        who = f"{self.role} 'transformers'"
        problems = []
        model = self.options.model
        # A Hugging Face id ("org/name") is looked up by from_pretrained; a path is ours to check.
        if model.startswith(("/", "./", "../", "~")) and not Path(model).expanduser().is_dir():
            problems.append(f"{who}: {self.role}.model {model!r} is not a folder")
        device = self.options.device
        if device.startswith("cuda"):
            index = torch.device(device).index or 0
            if not torch.cuda.is_available() or index >= torch.cuda.device_count():
                problems.append(f"{who}: {self.role}.device = {device!r}, but no such CUDA device")
        if self.options.template is not None or self.options.family is not None:
            try:
                load_template(self.options.family or "custom", self.role, self.options.template)
            except TemplateError as exc:
                problems.append(f"{who}: {exc}")
        return problems

    def _cache(self, ctx: RunContext) -> ResponseCache | None:
        return open_response_cache(self.options.cache, self.options.cache_dir, ctx.cache_dir)

    def _generation_params(self) -> dict[str, Any]:
        return {
            "do_sample": False,
            "max_new_tokens": self.options.max_new_tokens,
            "dtype": self.options.dtype,
        }

    def _key(
        self, cache: ResponseCache, template: PromptTemplate, prompt: Any, images: Sequence[str]
    ) -> str:
        return cache.key(
            backend=BACKEND,
            role=self.role,
            model=self.options.model,
            template_version=template.version,
            images=list(images),
            prompt=prompt,
            params=self._generation_params(),
        )

    def _model(self, ctx: RunContext) -> LocalModel:
        if self._local is None:
            device = (
                ctx.device if self.options.device == "auto" else torch.device(self.options.device)
            )
            self._local = load_local_model(
                self.options.model,
                device=device,
                dtype=self.options.dtype,
                images=self.role == "critic",
                trust_remote_code=self.options.trust_remote_code,
                local_files_only=self.options.local_files_only,
            )
        return self._local

    def _progress(
        self, ctx: RunContext, total: int
    ) -> tuple[Callable[[int], None], Callable[[], None]]:
        if not ctx.progress or total == 0:
            return (lambda n: None), (lambda: None)
        from rich.progress import Progress

        bar = Progress(transient=True)
        task = bar.add_task(f"{self.role} ({BACKEND})", total=total)
        bar.start()
        return (lambda n: bar.advance(task, n)), bar.stop

    def _transcript(self, ctx: RunContext, **record: Any) -> None:
        # redacted: a critique (a critic's failure) may carry a secret another plugin registered
        ctx.log_jsonl(
            "transcripts.jsonl",
            redact_json(
                {"stage": self.role, "backend": BACKEND, "model": self.options.model, **record}
            ),
        )


class TransformersCritic(_TransformersBackend):
    """Critic on a local Hugging Face image-text-to-text model (batched greedy generation)."""

    Options: ClassVar[type[PluginOptions]] = TransformersCriticOptions
    needs_true_masks: ClassVar[bool] = False
    role: ClassVar[str] = "critic"

    def critique(self, requests: Sequence[CritiqueRequest], ctx: RunContext) -> list[Critique]:
        """One Critique per request, in order; a batch the model fails on gives failures that
        name the error, and the other batches still run."""
        cache = self._cache(ctx)
        try:
            return self._critique_all(requests, cache, ctx)
        finally:
            if cache is not None:
                cache.close()

    def _critique_all(self, requests, cache, ctx) -> list[Critique]:
        results: list[Critique | None] = [None] * len(requests)
        pending: list[tuple[int, PromptTemplate, str, list[str], str | None]] = []
        for i, request in enumerate(requests):
            template = self._template(request.family)
            prompt = render_critic_prompt(template, request)
            hashes = [sha256_hex(png) for png in request.rendered.images]
            key = None if cache is None else self._key(cache, template, prompt, hashes)
            cached = None if key is None or ctx.refresh else cache.get(key)
            if cached is not None:
                results[i] = self._critique(request, cached, None, Usage(cache_hits=1))
                self._log(ctx, request, template, prompt, hashes, results[i], 0.0, True)
            else:
                pending.append((i, template, prompt, hashes, key))

        advance, stop = self._progress(ctx, len(pending))
        try:
            for chunk in _chunks(pending, self.options.batch_size):
                self._run_batch(chunk, requests, results, cache, ctx)
                advance(len(chunk))
        finally:
            stop()
        return [r for r in results if r is not None]

    def _run_batch(self, chunk, requests, results, cache, ctx) -> None:
        local = self._model(ctx)
        chats = []
        for i, _template, prompt, _hashes, _key in chunk:
            content = [{"type": "image"} for _ in requests[i].rendered.images]
            chats.append(
                [{"role": "user", "content": [*content, {"type": "text", "text": prompt}]}]
            )
        start = time.perf_counter()
        try:
            answers: list[GeneratedAnswer | None] = list(
                generate_batch(
                    local,
                    chats,
                    [requests[i].rendered.images for i, *_ in chunk],
                    self.options.max_new_tokens,
                )
            )
            error = None
        except (RuntimeError, ValueError) as exc:
            # Recorded per sample (the protocol asks for failures, not a lost stage); retryable:
            # the model, not the sample, failed.
            error = redact(f"generation failed: {type(exc).__name__}: {exc}")
            answers = [None] * len(chunk)
        latency = (time.perf_counter() - start) / len(chunk)
        for (i, template, prompt, hashes, key), answer in zip(chunk, answers, strict=True):
            request = requests[i]
            if answer is None:
                results[i] = self._critique(request, None, error, Usage(requests=1), True)
                self._log(ctx, request, template, prompt, hashes, results[i], latency, False)
                continue
            usage = Usage(answer.prompt_tokens, answer.completion_tokens, 0.0, 1, 0)
            if not answer.finished:
                # Half a discussion may lack the last clusters: not an answer to keep or cache.
                failure = (
                    f"critic answer cut off at max_new_tokens = {self.options.max_new_tokens}; "
                    "raise critic.max_new_tokens"
                )
                results[i] = self._critique(request, None, failure, usage)
            elif not answer.text:
                results[i] = self._critique(request, None, "the model's answer was empty", usage)
            else:
                results[i] = self._critique(request, answer.text, None, usage)
                if key is not None:
                    cache.put(
                        key,
                        answer.text,
                        {
                            "backend": BACKEND,
                            "role": self.role,
                            "model": self.options.model,
                            "sample_id": request.sample_id,
                        },
                    )
            self._log(
                ctx, request, template, prompt, hashes, results[i], latency, False, answer.text
            )

    def _critique(
        self,
        request: CritiqueRequest,
        text: str | None,
        failure: str | None,
        usage: Usage,
        retryable: bool = False,
    ) -> Critique:
        return Critique(
            sample_id=request.sample_id,
            colors=request.colors,
            text=text,
            failure=failure,
            model=self.options.model,
            usage=usage,
            family=request.family,
            label=request.label,
            retryable=retryable,
        )

    def _log(
        self, ctx, request, template, prompt, hashes, critique, latency, cache_hit, answer=None
    ) -> None:
        """One transcript line; ``answer`` is the model's text also when it was not usable."""
        files = list(request.rendered.files) or [None] * len(hashes)
        self._transcript(
            ctx,
            sample_id=request.sample_id,
            label=request.label,
            family=template.family,
            colors=list(request.colors),
            template_version=template.version,
            prompt=prompt,
            images=[{"sha256": h, "file": f} for h, f in zip(hashes, files, strict=False)],
            answer=critique.text if answer is None else answer,
            failure=critique.failure,
            retryable=critique.retryable,
            attempts=0 if cache_hit else 1,
            latency_s=round(latency, 4),
            cache_hit=cache_hit,
            usage=critique.usage.to_state(),
        )


class TransformersJudge(_TransformersBackend):
    """Judge on a local Hugging Face causal LM (or image-text-to-text model without images)."""

    Options: ClassVar[type[PluginOptions]] = TransformersJudgeOptions
    role: ClassVar[str] = "judge"
    options: TransformersJudgeOptions

    def judge(self, critiques: Sequence[Critique], ctx: RunContext) -> list[Verdicts]:
        """One Verdicts per critique, in order. An answer that fails validation is sent back with
        the error (``repair_attempts`` times, default once); an answer still invalid then is
        recorded as a failed Verdicts, never a guess."""
        cache = self._cache(ctx)
        try:
            return self._judge_all(critiques, cache, ctx)
        finally:
            if cache is not None:
                cache.close()

    def _judge_all(self, critiques, cache, ctx) -> list[Verdicts]:
        results: list[Verdicts | None] = [None] * len(critiques)
        pending: list[_JudgeTask] = []
        for i, critique in enumerate(critiques):
            if critique.text is None:
                # Not retryable: judging again cannot help; the critic's failure is the one a
                # re-run must fix.
                reason = redact(f"critic failed: {critique.failure}")
                results[i] = Verdicts(critique.sample_id, critique.colors, None, reason, attempts=0)
                self._transcript(
                    ctx,
                    sample_id=critique.sample_id,
                    colors=list(critique.colors),
                    verdicts=None,
                    failure=reason,
                    retryable=False,
                    attempts=0,
                    cache_hit=False,
                )
                continue
            template = self._template(critique.family)
            instructions, user = render_judge_prompt(template, critique)
            chat = self._chat(instructions, user)
            key = None if cache is None else self._key(cache, template, chat, [])
            cached = None if key is None or ctx.refresh else cache.get(key)
            task = _JudgeTask(i, critique, template, chat, key)
            if cached is not None:
                try:
                    parsed = parse_judge_answer(cached, critique.colors)
                except JudgeAnswerError:
                    # Only validated answers are stored; one that no longer parses (a changed
                    # parser) is asked again rather than trusted.
                    pending.append(task)
                    continue
                task.usage = Usage(cache_hits=1)
                results[i] = self._verdicts(task, parsed, 0)
                self._log(ctx, task, cached, parsed, None, 0, 0.0, True)
            else:
                pending.append(task)

        advance, stop = self._progress(ctx, len(pending))
        try:
            for chunk in _chunks(pending, self.options.batch_size):
                self._run_batch(list(chunk), results, cache, ctx)
                advance(len(chunk))
        finally:
            stop()
        return [r for r in results if r is not None]

    def _chat(self, instructions: str, user: str) -> list[dict[str, Any]]:
        if self.options.system_role:
            return [{"role": "system", "content": instructions}, {"role": "user", "content": user}]
        return [{"role": "user", "content": f"{instructions}\n\n{user}"}]

    def _run_batch(self, chunk: list[_JudgeTask], results, cache, ctx) -> None:
        local = self._model(ctx)
        last = self.options.repair_attempts + 1
        for attempt in range(1, last + 1):
            start = time.perf_counter()
            try:
                answers = generate_batch(
                    local, [t.chat for t in chunk], None, self.options.max_new_tokens
                )
            except (RuntimeError, ValueError) as exc:
                # Retryable: the model, not the answer, failed.
                error = redact(f"generation failed: {type(exc).__name__}: {exc}")
                for t in chunk:
                    results[t.index] = self._failure(t, error, attempt, retryable=True)
                    self._log(ctx, t, None, None, error, attempt, 0.0, False, retryable=True)
                return
            latency = (time.perf_counter() - start) / len(chunk)
            retry: list[_JudgeTask] = []
            for t, answer in zip(chunk, answers, strict=True):
                t.usage = t.usage + Usage(answer.prompt_tokens, answer.completion_tokens, 0.0, 1, 0)
                try:
                    parsed = parse_judge_answer(answer.text, t.critique.colors)
                except JudgeAnswerError as exc:
                    self._log(ctx, t, answer.text, None, str(exc), attempt, latency, False)
                    if attempt == last:
                        reason = f"invalid answer after {attempt} attempt(s): {exc}"
                        if not answer.finished:
                            reason += (
                                " (the answer was cut off at max_new_tokens = "
                                f"{self.options.max_new_tokens}; raise judge.max_new_tokens)"
                            )
                        results[t.index] = self._failure(t, reason, attempt)
                    else:
                        t.chat = [
                            *t.chat,
                            {"role": "assistant", "content": answer.text},
                            {
                                "role": "user",
                                "content": f"Your answer could not be used: {exc} Answer again.",
                            },
                        ]
                        retry.append(t)
                    continue
                results[t.index] = self._verdicts(t, parsed, attempt)
                self._log(ctx, t, answer.text, parsed, None, attempt, latency, False)
                if t.key is not None:
                    # Stored under the first prompt's key: a re-run gets the valid answer at once.
                    cache.put(
                        t.key,
                        answer.text,
                        {
                            "backend": BACKEND,
                            "role": self.role,
                            "model": self.options.model,
                            "sample_id": t.critique.sample_id,
                            "attempts": attempt,
                        },
                    )
            if not retry:
                return
            chunk = retry

    def _verdicts(self, task: _JudgeTask, parsed: ParsedVerdicts, attempts: int) -> Verdicts:
        c = task.critique
        return Verdicts(
            c.sample_id,
            c.colors,
            parsed.relevant,
            attempts=attempts,
            usage=task.usage,
            ignored_colors=parsed.ignored,
        )

    def _failure(
        self, task: _JudgeTask, reason: str, attempts: int, retryable: bool = False
    ) -> Verdicts:
        c = task.critique
        return Verdicts(
            c.sample_id, c.colors, None, reason, attempts, task.usage, retryable=retryable
        )

    def _log(
        self, ctx, task, answer, parsed, failure, attempt, latency, cache_hit, retryable=False
    ) -> None:
        self._transcript(
            ctx,
            sample_id=task.critique.sample_id,
            label=task.critique.label,
            family=task.template.family,
            colors=list(task.critique.colors),
            template_version=task.template.version,
            prompt=task.chat,
            answer=answer,
            verdicts=None
            if parsed is None
            else dict(
                zip(
                    task.critique.colors,
                    ["yes" if r else "no" for r in parsed.relevant],
                    strict=True,
                )
            ),
            ignored_colors=[] if parsed is None else list(parsed.ignored),
            failure=failure,
            retryable=retryable,
            attempts=attempt,
            latency_s=round(latency, 4),
            cache_hit=cache_hit,
            usage=task.usage.to_state(),
        )


@dataclass
class _JudgeTask:
    index: int
    critique: Critique
    template: PromptTemplate
    chat: list[dict[str, Any]]
    key: str | None
    usage: Usage = field(default_factory=Usage)
