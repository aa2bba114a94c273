"""Prompt templates for LVLM critics and judges: loading, checking and filling them in.

A template is a TOML file with a ``version`` string and a ``text`` (the prompt, with the
placeholders ``<label>``, ``<class_description>``, ``<num_clusters>``, ``<cluster_colors>``).
Judge templates may add ``user``: the user message around the critique (``<critique>``). A
critic template may say which effect of the attribution its clusters show with ``<effect>``,
filled with the request's ``effect`` from its table ``[effects]`` (one text per effect:
``positive``, ``negative``, ``absolute``), or from :data:`DEFAULT_EFFECT_TEXTS` when it has
none; a template without ``<effect>`` serves the positive effect only. The expert's class descriptions are not part of a template: they come with the data set
(``lvlmva/datasets/specs/<family>.toml``, or a provider's own setting) and fill
``<class_description>`` per sample.

Built-in templates live in :mod:`lvlmva.templates` (one per dataset family and role); a user
points the plugin option ``template`` at a file of their own. The version goes into the response
cache key, so editing a template and bumping its version never reuses stale answers.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lvlmva.records import EFFECTS, Critique, CritiqueRequest
from lvlmva.templates import ROLES, builtin_template_path

__all__ = [
    "PLACEHOLDERS",
    "REQUIRED_PLACEHOLDERS",
    "DEFAULT_JUDGE_USER",
    "DEFAULT_EFFECT_TEXTS",
    "EFFECT_PLACEHOLDER",
    "TemplateError",
    "PromptTemplate",
    "load_template",
    "format_colors",
    "render_critic_prompt",
    "render_judge_prompt",
]

#: every placeholder a template may use
PLACEHOLDERS = ("<label>", "<class_description>", "<num_clusters>", "<cluster_colors>", "<effect>")

#: filled from the template's [effects] table with the effect the clusters show
EFFECT_PLACEHOLDER = "<effect>"

#: what ``<effect>`` says in a template without an [effects] table of its own (it stands right
#: after a sentence; nothing for the positive effect, which prompts take for granted)
DEFAULT_EFFECT_TEXTS: dict[str, str] = {
    "positive": "",
    "negative": " The clusters mark evidence against the class <label>: regions that lowered the "
    "model's score for <label>. Judge each cluster by what it covers, exactly as you would judge "
    "evidence for the class.",
    "absolute": " The clusters mark the regions with the largest effect on the model's score for "
    "<label>, whether they raised it (evidence for <label>) or lowered it (evidence against "
    "<label>); the images do not tell which is which. Judge each cluster by what it covers, "
    "whichever way it acted.",
}

#: placeholders a template of each role must contain (a judge does not need the class)
REQUIRED_PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "critic": ("<label>", "<class_description>", "<num_clusters>", "<cluster_colors>"),
    "judge": ("<num_clusters>", "<cluster_colors>"),
}

#: the judge's user message when a template gives none
DEFAULT_JUDGE_USER = "The answer to convert:\n\n<critique>"

CRITIQUE_PLACEHOLDER = "<critique>"


class TemplateError(ValueError):
    """A template file is missing, unreadable, or lacks a key or placeholder; the message names
    the file and what is wrong."""


@dataclass(frozen=True)
class PromptTemplate:
    """A loaded prompt template.

    - ``family``: the dataset family (``"decoy-mnist"``, ``"knee"``, ``"skin"``, ...).
    - ``role``: ``"critic"`` or ``"judge"``.
    - ``version``: goes into the response cache key.
    - ``text``: the prompt (critic) or the instructions with few-shot examples (judge).
    - ``user``: the judge's user message around ``<critique>`` (unused by critics).
    - ``source``: the file it came from.
    - ``effects``: ``(effect, text)`` pairs, the text that replaces ``<effect>`` for each effect
      (empty when the text has no ``<effect>``: the template then serves the positive effect
      only).
    """

    family: str
    role: str
    version: str
    text: str
    user: str = DEFAULT_JUDGE_USER
    source: str = ""
    effects: tuple[tuple[str, str], ...] = ()


class TemplateBook:
    """A backend's templates for one role, each family loaded once.

    ``family`` (a plugin option) overrides the family a sample carries; ``path`` (a plugin
    option) replaces the built-in file."""

    def __init__(self, role: str, plugin: str, family: str | None, path: str | Path | None) -> None:
        self.role, self.plugin, self.family, self.path = role, plugin, family, path
        self._loaded: dict[str, PromptTemplate] = {}

    def get(self, family: str) -> PromptTemplate:
        family = self.family or family
        if not family:
            raise ValueError(
                f"{self.role} plugin {self.plugin!r}: no template family (the input carries "
                f"none); set {self.role}.family or {self.role}.template"
            )
        if family not in self._loaded:
            self._loaded[family] = load_template(family, self.role, self.path)
        return self._loaded[family]


def load_template(family: str, role: str, path: str | Path | None = None) -> PromptTemplate:
    """The template for ``family`` and ``role``: the built-in one, or the user's file at ``path``.

    Raises :class:`TemplateError` naming the file and the missing key or placeholder.
    """
    if role not in ROLES:
        raise TemplateError(f"unknown template role {role!r}; roles are: {', '.join(ROLES)}")
    if path is None:
        try:
            file = builtin_template_path(family, role)
        except FileNotFoundError as exc:
            raise TemplateError(str(exc)) from None
    else:
        file = Path(path).expanduser()
    try:
        raw = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TemplateError(f"{file}: no such {role} template file") from None
    except OSError as exc:
        raise TemplateError(f"{file}: cannot read {role} template: {exc}") from None
    try:
        data = tomllib.loads(raw)
    except tomllib.TOMLDecodeError as exc:
        raise TemplateError(f"{file}: not valid TOML: {exc}") from None

    for key in ("version", "text"):
        if key not in data:
            raise TemplateError(f"{file}: {role} template needs the key {key!r} (a string)")
        if not isinstance(data[key], str) or not data[key].strip():
            raise TemplateError(f"{file}: {key!r} must be a non-empty string, got {data[key]!r}")
    if "class_descriptions" in data:
        raise TemplateError(
            f"{file}: 'class_descriptions' is not a template key: the expert's class descriptions "
            "come with the data set (lvlmva/datasets/specs/<family>.toml, or the provider's "
            "class_descriptions setting), so that one text serves every prompt; remove the table"
        )
    allowed = {"version", "text", "user", "family", "role", "effects"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise TemplateError(f"{file}: unknown keys {unknown}; allowed: {sorted(allowed)}")
    if "role" in data and data["role"] != role:
        raise TemplateError(
            f"{file}: declares role {data['role']!r} but is used as a {role} template"
        )

    text = data["text"].strip()
    missing = [p for p in REQUIRED_PLACEHOLDERS[role] if p not in text]
    if missing:
        raise TemplateError(
            f"{file}: {role} template text lacks the placeholder(s) {', '.join(missing)} "
            f"(a {role} template must contain {', '.join(REQUIRED_PLACEHOLDERS[role])})"
        )
    effects = _effect_texts(file, role, text, data.get("effects"))
    user = data.get("user", DEFAULT_JUDGE_USER)
    if not isinstance(user, str):
        raise TemplateError(f"{file}: 'user' must be a string, got {user!r}")
    user = user.strip()
    if role == "judge" and CRITIQUE_PLACEHOLDER not in user:
        raise TemplateError(
            f"{file}: judge template 'user' lacks the placeholder {CRITIQUE_PLACEHOLDER}"
        )
    return PromptTemplate(
        family=str(data.get("family", family)),
        role=role,
        version=data["version"].strip(),
        text=text,
        user=user,
        source=str(file),
        effects=effects,
    )


def _effect_texts(file: Path, role: str, text: str, table: object) -> tuple[tuple[str, str], ...]:
    """The ``[effects]`` table of a template, checked: only where the text says ``<effect>``,
    a string for every effect and no other key; :data:`DEFAULT_EFFECT_TEXTS` when it has none."""
    if EFFECT_PLACEHOLDER not in text:
        if table is not None:
            raise TemplateError(
                f"{file}: has an [effects] table but its text has no {EFFECT_PLACEHOLDER} to put it in"
            )
        return ()
    if role != "critic":
        raise TemplateError(f"{file}: {EFFECT_PLACEHOLDER} is filled in critic templates only")
    if table is None:
        return tuple((e, DEFAULT_EFFECT_TEXTS[e]) for e in EFFECTS)
    if not isinstance(table, dict):
        raise TemplateError(f"{file}: 'effects' must be a table with a string for each of {', '.join(EFFECTS)}")
    missing = [e for e in EFFECTS if e not in table]
    unknown = sorted(set(table) - set(EFFECTS))
    if missing or unknown:
        problems = ([f"lacks {', '.join(missing)}"] if missing else []) + (
            [f"has unknown keys {unknown}"] if unknown else []
        )
        raise TemplateError(
            f"{file}: [effects] {' and '.join(problems)}; it needs exactly {', '.join(EFFECTS)}"
        )
    bad = [e for e in EFFECTS if not isinstance(table[e], str)]
    if bad:
        raise TemplateError(f"{file}: [effects] {', '.join(bad)} must be a string")
    if EFFECT_PLACEHOLDER in "".join(table.values()):
        raise TemplateError(f"{file}: an [effects] text cannot contain {EFFECT_PLACEHOLDER}")
    return tuple((e, table[e]) for e in EFFECTS)


def format_colors(colors: Sequence[str]) -> str:
    """Colour names as the prompts list them: ``"red, blue, green"``."""
    return ", ".join(colors)


def _fill(text: str, values: Mapping[str, str]) -> str:
    # Plain replacement, not str.format: templates contain JSON braces.
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    return text


def render_critic_prompt(template: PromptTemplate, request: CritiqueRequest) -> str:
    """The critic prompt for one alignment sample."""
    if template.role != "critic":
        raise TemplateError(
            f"{template.source}: a {template.role} template cannot render a critic prompt"
        )
    colors = request.colors
    if not colors:
        raise ValueError(f"sample {request.sample_id}: no cluster colours to ask about")
    if template.effects:
        text = template.text.replace(EFFECT_PLACEHOLDER, dict(template.effects)[request.effect])
    elif request.effect != "positive":
        raise TemplateError(
            f"{template.source}: the clusters show the {request.effect} effect (segmenter.effect), "
            f"but this template does not say so: add {EFFECT_PLACEHOLDER} to its text and a table "
            f"[effects] with a text for each of {', '.join(EFFECTS)}"
        )
    else:
        text = template.text
    # <effect> first: its text may use the other placeholders (<label>).
    return _fill(
        text,
        {
            "<label>": str(request.label),
            "<class_description>": str(request.class_description),
            "<num_clusters>": str(len(colors)),
            "<cluster_colors>": format_colors(colors),
        },
    )


def render_judge_prompt(template: PromptTemplate, critique: Critique) -> tuple[str, str]:
    """``(instructions, user_text)`` for judging one critique: the instructions (system message)
    with few-shot examples, and the user message that carries the critique's text."""
    if template.role != "judge":
        raise TemplateError(
            f"{template.source}: a {template.role} template cannot render a judge prompt"
        )
    if critique.text is None:
        raise ValueError(
            f"sample {critique.sample_id}: the critique failed ({critique.failure}); nothing to judge"
        )
    values = {
        "<label>": critique.label,
        "<num_clusters>": str(len(critique.colors)),
        "<cluster_colors>": format_colors(critique.colors),
    }
    instructions = _fill(template.text, values)
    # The critique goes in last so that text inside it is never treated as a placeholder.
    user = _fill(template.user, values).replace(CRITIQUE_PLACEHOLDER, critique.text.strip())
    return instructions, user
