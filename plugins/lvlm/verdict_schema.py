"""The Judge's answer format: a JSON object ``{"output": [{"color", "verdict"}, ...]}``.

:func:`parse_judge_answer` validates an answer with pydantic (every colour exactly once, verdict
``"yes"`` or ``"no"``) and raises :class:`JudgeAnswerError` with a message written to be sent
back to the model on a retry. Colours the sample does not have are set aside, not an error (see
:class:`ParsedVerdicts`). :func:`judge_json_schema` is the same format as a JSON schema for
servers that support structured output.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

__all__ = [
    "JudgeAnswerError",
    "ColorVerdict",
    "JudgeAnswer",
    "ParsedVerdicts",
    "extract_json_object",
    "parse_judge_answer",
    "judge_json_schema",
    "expected_format",
]


class JudgeAnswerError(ValueError):
    """A judge answer that cannot be turned into verdicts; the message says what is wrong in
    words a model can act on."""


class ColorVerdict(BaseModel):
    """One item of the ``"output"`` list."""

    # Extra keys (a model's "reason") are ignored: only colour and verdict matter.
    model_config = ConfigDict(extra="ignore")

    color: str
    verdict: Literal["yes", "no"]

    @field_validator("color", "verdict", mode="before")
    @classmethod
    def _normalise(cls, value: Any) -> Any:
        # "Grey " and "Yes" mean the same to a reader; case and spaces carry no information.
        return value.strip().lower() if isinstance(value, str) else value


class JudgeAnswer(BaseModel):
    """The whole answer; validated against the expected colours passed as context."""

    model_config = ConfigDict(extra="ignore")

    output: list[ColorVerdict]

    @model_validator(mode="after")
    def _every_color_once(self, info: ValidationInfo) -> JudgeAnswer:
        colors = [c.lower() for c in (info.context or {}).get("colors", ())]
        if not colors:
            return self
        seen = Counter(item.color for item in self.output)
        problems = []
        missing = [c for c in colors if c not in seen]
        if missing:
            problems.append("missing colour(s) " + ", ".join(f'"{c}"' for c in missing))
        # An extra colour repeated is set aside like any extra colour; only a sample's own
        # colour given twice leaves its verdict in doubt.
        duplicate = [c for c, n in seen.items() if n > 1 and c in colors]
        if duplicate:
            problems.append(
                "colour(s) listed more than once " + ", ".join(f'"{c}"' for c in duplicate)
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


@dataclass(frozen=True)
class ParsedVerdicts:
    """A valid judge answer: ``relevant[j]`` is the verdict for the sample's colour ``j`` (True =
    "yes", relevant), and ``ignored`` the colours the answer gave verdicts for that the sample
    does not have (in the order they appear), kept so that they can be recorded."""

    relevant: tuple[bool, ...]
    ignored: tuple[str, ...] = ()


def expected_format(colors: Sequence[str]) -> str:
    """A one-sentence description of the format, appended to error messages."""
    return (
        'Reply with JSON only: {"output": [{"color": ..., "verdict": "yes" or "no"}, ...]} '
        f"with exactly {len(colors)} items, one for each of: {', '.join(colors)}."
    )


_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)


def extract_json_object(text: str) -> Any:
    """The one JSON value in ``text``: the whole text, the content of a ```json fence, or the
    first ``{...}`` object inside surrounding prose. Raises :class:`JudgeAnswerError`."""
    stripped = text.strip()
    if not stripped:
        raise JudgeAnswerError("the answer was empty")
    try:
        return json.loads(stripped)
    except json.JSONDecodeError:
        pass  # not bare JSON: look for a fenced block or an object inside prose below
    fence = _FENCE.search(stripped)
    if fence is not None:
        try:
            return json.loads(fence.group(1).strip())
        except json.JSONDecodeError as exc:
            raise JudgeAnswerError(f"the ```json block is not valid JSON ({exc})") from None
    start = stripped.find("{")
    if start < 0:
        raise JudgeAnswerError("the answer contains no JSON object")
    try:
        value, _ = json.JSONDecoder().raw_decode(stripped, start)
    except json.JSONDecodeError as exc:
        raise JudgeAnswerError(f"the answer is not valid JSON ({exc})") from None
    return value


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = err["loc"]
        if loc and loc[0] == "output" and len(loc) >= 2 and isinstance(loc[1], int):
            where = f"item {loc[1] + 1}" + (f' "{loc[2]}"' if len(loc) > 2 else "")
        elif loc:
            where = '"' + ".".join(str(p) for p in loc) + '"'
        else:
            where = ""
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "is missing"
        elif err["type"] == "literal_error":
            msg = f'must be "yes" or "no", got {err.get("input")!r}'
        parts.append(f"{where} {msg}".strip())
    return "; ".join(parts)


def parse_judge_answer(text: str, colors: Sequence[str]) -> ParsedVerdicts:
    """Verdicts in the order of ``colors`` (True = "yes", relevant; False = "no", spurious), and
    the colours not among ``colors`` that the answer also judged, set aside.

    An extra colour says nothing about the sample's clusters, so it does not spoil the verdicts
    that are there. Raises :class:`JudgeAnswerError` when the answer is not JSON, lacks
    ``"output"``, misses or repeats one of ``colors``, or has a verdict other than yes/no.
    """
    if not colors:
        raise ValueError("parse_judge_answer needs the expected colours")
    try:
        value = extract_json_object(text)
    except JudgeAnswerError as exc:
        raise JudgeAnswerError(f"{exc}. " + expected_format(colors)) from None
    if not isinstance(value, dict):
        raise JudgeAnswerError(
            f'expected a JSON object with the key "output", got a {type(value).__name__}. '
            + expected_format(colors)
        )
    if "output" not in value:
        raise JudgeAnswerError(
            f'the JSON object has no key "output" (keys: {", ".join(map(str, value)) or "none"}). '
            + expected_format(colors)
        )
    try:
        answer = JudgeAnswer.model_validate(value, context={"colors": list(colors)})
    except ValidationError as exc:
        raise JudgeAnswerError(
            f"invalid answer: {_describe(exc)}. " + expected_format(colors)
        ) from None
    by_color = {item.color: item.verdict == "yes" for item in answer.output}
    wanted = [c.lower() for c in colors]
    ignored = tuple(dict.fromkeys(item.color for item in answer.output if item.color not in wanted))
    return ParsedVerdicts(tuple(by_color[c] for c in wanted), ignored)


def judge_json_schema(colors: Sequence[str]) -> dict[str, Any]:
    """JSON schema of a valid answer for ``colors`` (for structured-output requests)."""
    n = len(colors)
    return {
        "type": "object",
        "properties": {
            "output": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "color": {"type": "string", "enum": list(colors)},
                        "verdict": {"type": "string", "enum": ["yes", "no"]},
                    },
                    "required": ["color", "verdict"],
                    "additionalProperties": False,
                },
                "minItems": n,
                "maxItems": n,
            }
        },
        "required": ["output"],
        "additionalProperties": False,
    }
