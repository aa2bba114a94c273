"""The transport to a local Hugging Face model: batched greedy generation in this process.

Requests are generated ``batch_size`` at a time (left-padded), through the model's chat
template; a critic request's images go before its prompt. The model is loaded on the first
request (``load``), so that a call whose answers all come from the cache loads nothing. A
generation error (out of memory, a device fault) is a retryable failure of the batch it hit;
the other batches still run. An answer that ran out of ``max_new_tokens`` before its
end-of-sequence token comes back with ``finish_reason = "length"``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lvlmva.secrets import redact

from .cache import sha256_hex
from .local_models import LocalModel, generate_batch
from .transport import ChatAnswer, ChatRequest, Outcome, TransportFailure

__all__ = ["TransformersTransport"]


class TransformersTransport:
    """Greedy answers of a local model for one role (``options``: the plugin's; ``load``:
    returns the loaded model, loading it on the first call)."""

    kind = "transformers"

    def __init__(self, options: Any, role: str, load: Callable[[], LocalModel]) -> None:
        self.options, self.role, self._load = options, role, load
        self.model = options.model

    def _chat(self, request: ChatRequest) -> list[dict[str, Any]]:
        """The chat the model's template renders: instructions as a system message (or in front
        of the prompt when ``system_role`` is off), a critic's images before its prompt."""
        if request.images:
            user: Any = [*({"type": "image"} for _ in request.images), {"type": "text", "text": request.user}]
            first = [{"role": "user", "content": user}]
        elif request.system is None:
            first = [{"role": "user", "content": request.user}]
        elif getattr(self.options, "system_role", True):
            first = [{"role": "system", "content": request.system}, {"role": "user", "content": request.user}]
        else:
            first = [{"role": "user", "content": f"{request.system}\n\n{request.user}"}]
        return [*first, *({"role": role, "content": text} for role, text in request.turns)]

    def key_parts(self, request: ChatRequest) -> dict[str, Any]:
        """The backend, role, model, the images' hashes, the prompt (a critic's text; a judge's
        chat as the model sees it) and the generation parameters."""
        prompt: Any = request.user if request.system is None else self._chat(request)
        params = {"do_sample": False, "max_new_tokens": self.options.max_new_tokens, "dtype": self.options.dtype}
        return {
            "backend": self.kind, "role": self.role, "model": self.model,
            "images": [sha256_hex(png) for png in request.images], "prompt": prompt, "params": params,
        }  # fmt: skip

    async def answer(self, requests: Sequence[ChatRequest], deliver: Callable[[int, Outcome], None]) -> None:
        size = self.options.batch_size
        for start in range(0, len(requests), size):
            chunk = requests[start : start + size]
            local = self._load()
            images = [list(r.images) for r in chunk] if any(r.images for r in chunk) else None
            try:
                answers = generate_batch(local, [self._chat(r) for r in chunk], images, self.options.max_new_tokens)
            except (RuntimeError, ValueError) as exc:
                # the model, not the request, failed: a new run asks again
                failure = TransportFailure(redact(f"generation failed: {type(exc).__name__}: {exc}"))
                for i in range(len(chunk)):
                    deliver(start + i, failure)
                continue
            for i, a in enumerate(answers):
                deliver(start + i, ChatAnswer(
                    a.text, "stop" if a.finished else "length", a.prompt_tokens, a.completion_tokens,
                ))  # fmt: skip
