"""What makes an LVLM answer usable, whatever backend gave it.

A critic answer must be whole (not cut off at the token limit, not empty) and discuss every
cluster colour of its sample: an answer such as "Sure! Here is my analysis..." that names no
colour, or one that stops before the last colours, says nothing about the clusters it leaves
out. (A judge answer must parse into one verdict per colour: :mod:`.verdict_schema`.) The
checks return what is wrong, in words that name the setting to change where one helps, or
``None`` for an answer that can be used.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from lvlmva.rendering import COLOR_SYNONYMS

__all__ = ["colors_not_discussed", "critic_answer_problem", "cut_off_note"]


def colors_not_discussed(text: str, colors: Sequence[str]) -> list[str]:
    """The colours of ``colors`` that ``text`` never names (as a word, any case; a colour's
    spelling variants count: "gray" for "grey")."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    missing = []
    for color in colors:
        names = {color.lower()} | {alias for alias, name in COLOR_SYNONYMS.items() if name == color.lower()}
        if not names & words:
            missing.append(color)
    return missing


def critic_answer_problem(
    text: str, finish_reason: str | None, colors: Sequence[str], limit: tuple[str, int]
) -> str | None:
    """Why a critic answer cannot be used, or ``None``; ``limit`` is the option that bounds an
    answer's length and its value (``("max_tokens", 1024)``)."""
    name, value = limit
    if finish_reason == "length":
        # Half a discussion may lack the last clusters. (An empty one is a reasoning model that
        # spent the whole budget on thinking.)
        return f"critic answer cut off at {name} = {value}; raise critic.{name}"
    if not text.strip():
        return f"critic returned an empty answer (finish_reason={finish_reason})"
    missing = colors_not_discussed(text, colors)
    if len(missing) == len(colors):
        return f"critic answer discusses none of the cluster colours ({', '.join(colors)})"
    if missing:
        return f"critic answer does not discuss the cluster colour(s) {', '.join(missing)}"
    return None


def cut_off_note(role: str, limit: tuple[str, int]) -> str:
    """What to add to an invalid answer's failure when the answer was cut off."""
    name, value = limit
    return f" (the answer was cut off at {name} = {value}; raise {role}.{name})"
