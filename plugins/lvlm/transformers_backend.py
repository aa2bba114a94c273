"""Critic and Judge on a local Hugging Face model (``transformers``).

The Critic runs an image-text-to-text model (``AutoProcessor`` + ``AutoModelForImageTextToText``)
on the three rendered images of each sample and the critic prompt; the Judge runs a text-only
causal LM (``AutoTokenizer`` + ``AutoModelForCausalLM``) or an image-text-to-text model without
images. The flows (prompts, cache, checks, repair, transcripts, failure kinds) are
:mod:`.flow`'s, the same as the OpenAI backend's; this module gives their options, the checks
before a run and the transport (:mod:`.transformers_transport`: batched greedy generation with
left padding through the model's chat template).

``model`` is a local folder or a Hugging Face model id; fetching a model id is left to
``from_pretrained`` (set ``local_files_only`` to forbid network access). The model is loaded
lazily, on the first answer that is not in the cache, so a fully cached re-run loads nothing.
transformers is imported inside functions: importing this module stays cheap.

A generation error (out of memory, a device fault) is a ``retryable`` failure: it says nothing
about the sample. An answer that is empty, cut off at ``max_new_tokens``, or a judge answer
still invalid after repair is an unusable answer (:mod:`.flow`).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field

from lvlmva.plugins.lvlm.flow import (
    LvlmCritic,
    LvlmJudge,
    LvlmPlugin,
    max_invalid_attempts_field,
    retry_invalid_field,
)
from lvlmva.plugins.lvlm.local_models import (
    GeneratedAnswer,
    LocalModel,
    generate_batch,
    load_local_model,
    resolve_dtype,
)
from lvlmva.plugins.lvlm.prompts import TemplateError, load_template
from lvlmva.plugins.lvlm.transformers_transport import TransformersTransport
from lvlmva.protocols import PluginOptions, RunContext

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
    max_invalid_attempts: int = max_invalid_attempts_field()
    retry_invalid: bool = retry_invalid_field()


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


# -- the plugins -----------------------------------------------------------------------------


class _TransformersPlugin(LvlmPlugin):
    """What the transformers Critic and Judge add to the flows: the model, loaded once on first
    use, the checks before a run, and the transport."""

    backend: ClassVar[str] = BACKEND
    options: TransformersOptions

    def __init__(self, options: TransformersOptions) -> None:
        super().__init__(options)
        self._local: LocalModel | None = None

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

    @property
    def token_limit(self) -> tuple[str, int]:
        return ("max_new_tokens", self.options.max_new_tokens)

    def transport(self, ctx: RunContext) -> TransformersTransport:
        return TransformersTransport(self.options, self.role, lambda: self._model(ctx))


class TransformersCritic(_TransformersPlugin, LvlmCritic):
    """Critic on a local Hugging Face image-text-to-text model (batched greedy generation)."""

    Options: ClassVar[type[PluginOptions]] = TransformersCriticOptions
    needs_true_masks: ClassVar[bool] = False
    role: ClassVar[str] = "critic"


class TransformersJudge(_TransformersPlugin, LvlmJudge):
    """Judge on a local Hugging Face causal LM (or image-text-to-text model without images)."""

    Options: ClassVar[type[PluginOptions]] = TransformersJudgeOptions
    role: ClassVar[str] = "judge"
    options: TransformersJudgeOptions
