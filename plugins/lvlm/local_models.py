"""Local Hugging Face models for the transformers backend: loading one for generation, and
batched greedy generation over chats (with images for an image-text-to-text model).

transformers is imported inside functions: importing this module stays cheap.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["LocalModel", "load_local_model", "GeneratedAnswer", "generate_batch", "resolve_dtype"]


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
