"""The seam between the LVLM flows and the backends that answer them.

The critic and judge flows (:mod:`.flow`) decide what to ask, read and write the response cache,
check answers, send invalid judge answers back and write transcripts. A *transport* only answers
chat requests: given a list of :class:`ChatRequest` it hands back, for each, a
:class:`ChatAnswer` (the text, the tokens it took, why it ended) or a :class:`TransportFailure`.
It gets the whole list at once and answers it asynchronously, in any order and at any pace: one
request at a time, concurrently (an OpenAI-compatible server), in batches (a local model), or as
one job that is polled until it is done (a batch API). It hands each outcome to ``deliver`` as
soon as it has it, so that the flow stores what was paid for even when the run is killed later.

A transport also says what determines an answer on its backend (:meth:`Transport.key_parts`):
the response cache keys requests by it, so it must never hold a secret or a server address.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

__all__ = ["AnswerSchema", "ChatRequest", "ChatAnswer", "TransportFailure", "Outcome", "Transport"]


@dataclass(frozen=True)
class AnswerSchema:
    """The JSON an answer must be (structured output, where a backend can ask for it)."""

    name: str
    schema: dict[str, Any]


@dataclass(frozen=True)
class ChatRequest:
    """One chat to answer.

    - ``user``: the text of the first user message; ``images``: PNG bytes shown with it.
    - ``system``: instructions as a system message (``None``: no system message).
    - ``turns``: ``(role, text)`` messages after the first user message (a judge's repair: its
      invalid answer as ``"assistant"``, the validation error as ``"user"``).
    - ``seed``: the seed to sample with, where the backend takes one.
    - ``schema``: the JSON the answer must be, where the backend can enforce it.
    - ``label``: what the request is for (``"sample 12"``), for progress and a batch's ids.
    """

    user: str
    images: tuple[bytes, ...] = ()
    system: str | None = None
    turns: tuple[tuple[str, str], ...] = ()
    seed: int = 0
    schema: AnswerSchema | None = None
    label: str = ""

    def then(self, answer: str, reply: str) -> ChatRequest:
        """This chat continued by the model's ``answer`` and the user's ``reply``."""
        return replace(self, turns=(*self.turns, ("assistant", answer), ("user", reply)))


@dataclass(frozen=True)
class ChatAnswer:
    """An answer had: its text; ``finish_reason`` ``"length"`` when it was cut off at the
    backend's token limit; the tokens and cost it took; ``attempts`` the transport spent on it
    (retries of transient errors included) and each failed attempt's error."""

    text: str
    finish_reason: str | None = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    attempts: int = 1
    errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class TransportFailure:
    """No answer could be had. ``message`` names the cause and where ("HTTP 503 at
    http://127.0.0.1:8000/v1"), the same text for every request it hit. ``retryable``: asking
    again later may succeed (a transport problem: it says nothing about the request); False
    when the request itself was refused and asking it again unchanged cannot help."""

    message: str
    retryable: bool = True
    attempts: int = 1
    errors: tuple[str, ...] = ()


Outcome = ChatAnswer | TransportFailure


class Transport(Protocol):
    """Answers chat requests for one role of one backend.

    ``kind`` names the backend in cache keys and transcripts (``"openai"``,
    ``"transformers"``); ``model`` is the model it asks."""

    kind: str
    model: str

    def key_parts(self, request: ChatRequest) -> dict[str, Any]:
        """What determines the answer to ``request`` on this backend (``backend``, ``role``,
        ``model``, ``prompt``, ``images``, ``params``), for :meth:`ResponseCache.key`."""
        ...

    async def answer(
        self, requests: Sequence[ChatRequest], deliver: Callable[[int, Outcome], None]
    ) -> None:
        """Answer every request: call ``deliver(i, outcome)`` exactly once for each index ``i``
        of ``requests``, as soon as its outcome is had; return when all are delivered."""
        ...
