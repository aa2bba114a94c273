"""A judge that reads verdicts out of critique text with fixed rules (no language model)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from pydantic import Field

from lvlmva.protocols import PluginOptions, RunContext
from lvlmva.records import Critique, Verdicts
from lvlmva.rendering import COLOR_SYNONYMS, PALETTE
from lvlmva.secrets import redact

__all__ = ["RulesJudge"]

# Colour words that are not in the palette: a heading that names one of them is an error, not
# something to skip, because it means the critic saw or invented a cluster that does not exist.
_OTHER_COLORS = (
    "magenta",
    "teal",
    "navy",
    "olive",
    "lime",
    "maroon",
    "beige",
    "gold",
    "golden",
    "silver",
    "tan",
    "indigo",
    "lavender",
    "crimson",
    "aqua",
    "peach",
    "salmon",
)

_REGION = r"(?:cluster|region|segment|area|part|zone)s?"
# Words after which a verdict follows ("Verdict: no", "**Conclusion:** Not relevant").
_MARKER = re.compile(
    r"\b(?:verdict|conclusion|final answer|answer|decision|judge?ment|assessment|classification)"
    r"\s*(?:\([^)\n]*\))?\s*[:=\-\u2013\u2014]+",
)
_NEGATORS = {"not", "never", "neither", "nor", "cannot", "hardly", "without"}
# A negation does not reach across these words ("not relevant but spurious").
_NEGATION_STOPS = {"but", "and", "or", "so", "because", "yet", "while", "although"}
_NEGATION_WINDOW = 3
_YES_NO_ANSWER = re.compile(r"\b(?P<word>[a-z]+)\s*\??\s*[:=]\s*(?P<ans>yes|no|true|false)\b")


def _normalise(text: str) -> str:
    """Lower case, typographic apostrophes made plain, markdown emphasis and headers removed."""
    text = text.replace("\u2019", "'").replace("\u2018", "'").lower()
    text = re.sub(r"[*`]+|__+", "", text)
    return re.sub(r"(?m)^([ \t>]*)#+[ \t]*", r"\1", text)


class RulesJudge:
    """Rule-based judge: parses "<colour>: ... Verdict: yes/no" discussions into verdicts.

    The critique is split into one section per cluster colour. A section starts where a line
    begins with the colour (``**Red**:``, ``### Grey Cluster``, ``1. The blue cluster ...``,
    ``- Cluster 2 (green):``) or where the colour is followed by a colon anywhere
    (``Red: yes, Blue: no``). Within a section the verdict is the phrase after the last marker
    word (``Verdict:``, ``Conclusion:``, ``Answer:``, ...) or, without one, the section's last
    sentence; it is "yes" when it holds only yes words (``yes``, ``relevant``, ...) and "no" when
    it holds only no words (``no``, ``spurious``, ``not relevant``, ...). A word negated by
    ``not``/``n't``/``never`` up to three words before it counts as the opposite, and
    ``Spurious: yes`` reads as "no".

    Every colour of the sample must get exactly one consistent verdict. A missing colour, a
    colour whose verdict is ambiguous or absent, and a heading that names a colour the sample
    does not have all fail the sample (the failure names the colour and the problem); a critique
    that already failed passes its reason on. A critique that is the JSON a judge model returns
    (``{"output": [{"color": ..., "verdict": "yes"|"no"}, ...]}``) is read as such; there, as for
    the model judges, a colour the sample does not have is set aside in ``ignored_colors``.
    """

    class Options(PluginOptions):
        """Settings of the rules judge."""

        yes_words: list[str] = Field(
            default_factory=lambda: [
                "yes",
                "relevant",
                "related",
                "supports",
                "support",
                "valid",
                "legitimate",
                "genuine",
                "meaningful",
            ],
            min_length=1,
            description=(
                'Words or phrases that mean the cluster is relevant (verdict "yes"); matched as '
                "whole words, case-insensitive; a preceding negation flips them."
            ),
        )
        no_words: list[str] = Field(
            default_factory=lambda: [
                "no",
                "irrelevant",
                "unrelated",
                "spurious",
                "shortcut",
                "artifact",
                "artefact",
                "confounder",
                "confounding",
            ],
            min_length=1,
            description=(
                'Words or phrases that mean the cluster is spurious (verdict "no"); matched as '
                "whole words, case-insensitive; a preceding negation flips them."
            ),
        )

    def __init__(self, options: RulesJudge.Options | None = None) -> None:
        self.options = options if options is not None else self.Options()
        yes = {tuple(w.lower().split()) for w in self.options.yes_words if w.strip()}
        no = {tuple(w.lower().split()) for w in self.options.no_words if w.strip()}
        both = yes & no
        if both:
            raise ValueError(f"judge: {' '.join(sorted(both)[0])!r} is both a yes and a no word")
        # Longest phrases first so that "not spurious" wins over "spurious" at the same place.
        self._phrases = sorted(
            [(p, True) for p in yes] + [(p, False) for p in no], key=lambda x: -len(x[0])
        )
        self._answers = {w[0]: v for w, v in self._phrases if len(w) == 1}

    def judge(self, critiques: Sequence[Critique], ctx: RunContext) -> list[Verdicts]:
        """One ``Verdicts`` per critique, in order; unreadable answers become failures."""
        return [self._one(c) for c in critiques]

    # -- one critique ---------------------------------------------------------------------------

    def _one(self, critique: Critique) -> Verdicts:
        colors = tuple(critique.colors)
        if critique.text is None:
            return self._failed(critique, f"critic failed: {critique.failure}")
        ignored: tuple[str, ...] = ()
        from_json = self._from_json(critique.text, colors)
        if from_json is not None:
            relevant, problems, ignored = from_json
        else:
            relevant, problems = self._from_text(critique.text, colors)
        if problems:
            return self._failed(critique, "; ".join(problems))
        return Verdicts(
            sample_id=critique.sample_id, colors=colors, relevant=relevant, ignored_colors=ignored
        )

    @staticmethod
    def _failed(critique: Critique, reason: str) -> Verdicts:
        return Verdicts(
            sample_id=critique.sample_id,
            colors=tuple(critique.colors),
            relevant=None,
            # the reason may quote a critic's failure, which may quote a secret
            failure=redact(f"rules judge, sample {critique.sample_id}: {reason}"),
        )

    def _from_json(
        self, text: str, colors: tuple[str, ...]
    ) -> tuple[tuple[bool, ...] | None, list[str], tuple[str, ...]] | None:
        """Verdicts, problems and the colours set aside (judged but not the sample's) from a
        judge model's JSON answer; ``None`` when the text is not JSON."""
        stripped = text.strip()
        if not stripped.startswith("{"):
            return None
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError:
            return None  # prose that happens to start with a brace: read it as text
        items = data.get("output") if isinstance(data, dict) else None
        if not isinstance(items, list):
            return None, ['JSON answer lacks an "output" list'], ()
        found: dict[str, list[bool | None]] = {}
        problems: list[str] = []
        for item in items:
            if not isinstance(item, dict) or not {"color", "verdict"} <= set(item):
                problems.append(f"JSON item {item!r} needs keys color and verdict")
                continue
            color = _canonical(str(item["color"]))
            verdict = str(item["verdict"]).strip().lower()
            if verdict not in ("yes", "no"):
                problems.append(f"colour {color!r}: verdict {item['verdict']!r} is not yes/no")
                continue
            found.setdefault(color, []).append(verdict == "yes")
        own = {_canonical(c) for c in colors}
        ignored = tuple(c for c in found if c not in own)
        return (*self._collect(found, colors, problems), ignored)

    def _from_text(
        self, text: str, colors: tuple[str, ...]
    ) -> tuple[tuple[bool, ...] | None, list[str]]:
        norm = _normalise(text)
        found: dict[str, list[bool | None]] = {}
        problems: list[str] = []
        sections = _sections(norm, colors)
        for color, body in sections:
            if color not in colors:
                problems.append(
                    f"unknown colour {color!r} in the critique (this sample's colours: "
                    f"{', '.join(colors)})"
                )
                continue
            snippet = _verdict_snippet(body)
            polarity = self._polarity(snippet)
            if polarity == "ambiguous":
                problems.append(f"colour {color!r}: ambiguous verdict (yes and no in {snippet!r})")
                found.setdefault(color, []).append(None)
                continue
            found.setdefault(color, [])
            if polarity is not None:
                found[color].append(polarity)
        return self._collect(found, colors, problems)

    @staticmethod
    def _collect(
        found: dict[str, list[bool | None]], colors: tuple[str, ...], problems: list[str]
    ) -> tuple[tuple[bool, ...] | None, list[str]]:
        """Check that every colour got one consistent verdict; ``None`` marks a section whose
        ambiguity is already among ``problems``."""
        out: list[bool] = []
        for color in colors:
            values = found.get(color)
            if values is not None and None in values:
                continue
            if values is None:
                problems.append(f"colour {color!r}: not discussed (no section starts with it)")
            elif not values:
                problems.append(f"colour {color!r}: no yes/no verdict found in its discussion")
            elif len(set(values)) > 1:
                problems.append(f"colour {color!r}: ambiguous verdict (both yes and no given)")
            else:
                out.append(values[0])
        if problems:
            return None, problems
        return tuple(out), []

    def _polarity(self, snippet: str) -> bool | str | None:
        """True (yes), False (no), ``"ambiguous"``, or ``None`` when no verdict word occurs."""
        seen: set[bool] = set()
        for clause in re.split(
            r"[,;:()\[\]\u2013\u2014]|\s-\s", _resolve_answers(snippet, self._answers)
        ):
            tokens = re.findall(r"[a-z]+(?:'[a-z]+)?", clause)
            i, last_end = 0, 0
            while i < len(tokens):
                hit = next(
                    ((p, v) for p, v in self._phrases if tuple(tokens[i : i + len(p)]) == p),
                    None,
                )
                if hit is None:
                    i += 1
                    continue
                phrase, value = hit
                if _negated(tokens, i, last_end):
                    value = not value
                seen.add(value)
                i += len(phrase)
                last_end = i
        if len(seen) > 1:
            return "ambiguous"
        return next(iter(seen)) if seen else None


def _canonical(word: str) -> str:
    word = word.strip().lower()
    return COLOR_SYNONYMS.get(word, word)


def _negated(tokens: list[str], i: int, last_end: int) -> bool:
    for j in range(i - 1, max(last_end, i - _NEGATION_WINDOW) - 1, -1):
        tok = tokens[j]
        if tok in _NEGATION_STOPS:
            return False
        if tok in _NEGATORS or tok.endswith("n't"):
            return True
    return False


def _resolve_answers(snippet: str, answers: dict[str, bool]) -> str:
    """``relevant: yes`` -> ``yes``, ``spurious: yes`` -> ``no``: a question word answered."""

    def repl(m: re.Match[str]) -> str:
        word, ans = m.group("word"), m.group("ans") in ("yes", "true")
        if word not in answers:
            return m.group(0)
        return "yes" if answers[word] == ans else "no"

    return _YES_NO_ANSWER.sub(repl, snippet)


def _color_pattern(words: Sequence[str]) -> str:
    return "|".join(sorted((re.escape(w) for w in set(words)), key=len, reverse=True))


def _sections(norm: str, colors: tuple[str, ...]) -> list[tuple[str, str]]:
    """``(colour, body)`` per section of normalised text, in order of appearance."""
    known = {c.lower() for c in colors}
    known |= {s for s, c in COLOR_SYNONYMS.items() if c in known}
    every = {n for n, _ in PALETTE} | set(COLOR_SYNONYMS) | set(_OTHER_COLORS) | known
    any_color = _color_pattern(every)
    known_color = _color_pattern(known) if known else r"(?!x)x"
    bullet = r"^[ \t>]*(?:[-+\u2022]|\d+[.)]|[a-z][.)](?=\s))?[ \t]*"
    prefix = r"(?:(?:the|for the|in the|cluster|region|segment)\s*(?:\d+\s*)?[(\[]?\s*)?"
    heading_end = rf"(?:\s+{_REGION})?\s*[)\]]?\s*(?=[:=\-\u2013\u2014(]|$)"
    patterns = [
        # A known colour at the start of a line, whatever follows ("The red cluster covers").
        re.compile(rf"(?m){bullet}{prefix}(?P<c>{known_color})\b"),
        # Any colour word as a heading: at line start followed by ':', a dash or the line end.
        re.compile(rf"(?m){bullet}{prefix}(?P<c>{any_color})\b{heading_end}"),
        # Any colour word followed by a colon or a spaced dash anywhere ("Red: yes, Blue: no",
        # "Summary: red – no, blue – yes").
        re.compile(
            rf"(?<![a-z])(?P<c>{any_color})(?:\s+{_REGION})?\s*[)\]]?(?:\s*:|\s+[\-\u2013\u2014]\s)"
        ),
    ]
    # colour word start -> (heading start, colour word end, colour); a section's body runs from
    # its colour word to the start of the next heading (its bullet or line start included).
    found: dict[int, tuple[int, int, str]] = {}
    for pattern in patterns:
        for m in pattern.finditer(norm):
            found.setdefault(m.start("c"), (m.start(), m.end("c"), _canonical(m.group("c"))))
    ordered = [found[k] for k in sorted(found)]
    out = []
    for k, (_, end, color) in enumerate(ordered):
        stop = ordered[k + 1][0] if k + 1 < len(ordered) else len(norm)
        out.append((color, norm[end:stop]))
    return out


def _verdict_snippet(body: str) -> str:
    """The words that carry a section's verdict: after its last marker, else its last sentence."""
    markers = list(_MARKER.finditer(body))
    if markers:
        rest = body[markers[-1].end() :].lstrip()
        return re.split(r"\n|[.!?](?:\s|$)", rest, maxsplit=1)[0].strip()
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", body) if re.search(r"[a-z]", s)]
    return sentences[-1] if sentences else ""
