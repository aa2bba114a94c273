"""What a pipeline stage is: a declaration and a run function that receives what it declared.

A :class:`Stage` names the settings it reads, the plugins it uses and the artifacts of other
stages it takes. Its run function gets a :class:`StageCall` that holds exactly those and nothing
else: asking it for an undeclared setting, plugin or input is an error. The orchestrator hashes
the same declarations into the stage's fingerprint, so what a stage uses and what its
fingerprint covers cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..protocols import RunContext

if TYPE_CHECKING:
    from torch import nn

    from .codecs import Codec

__all__ = ["Stage", "StageView", "StageCall", "StageIncomplete", "UndeclaredAccess"]


class UndeclaredAccess(KeyError):
    """A stage asked for a setting, plugin or input it did not declare."""

    def __str__(self) -> str:  # KeyError quotes its message; this one is a sentence
        return str(self.args[0])


class StageIncomplete(Exception):
    """A stage that could not finish its work for reasons that say nothing about its result
    (LVLM requests that got no answer): it is not committed, and a re-run computes it again."""


#: names a stage folder may not take: the files and folders at the top of a run directory
RESERVED_NAMES = frozenset(
    {"figures", "results.json", "report.md", "env.json", "settings.resolved.toml", "metrics.jsonl",
     "transcripts.jsonl", "timings.json", "review", "logs"}
)  # fmt: skip

_NAME = re.compile(r"^[a-z][a-z0-9_-]*(\.[a-z0-9_-]+)*$")


def _split_optional(names: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) local names; ``"segment=segment.j5"`` is local name ``segment``."""
    required = tuple(n.partition("=")[0] for n in names if not n.endswith("?"))
    optional = tuple(n[:-1].partition("=")[0] for n in names if n.endswith("?"))
    return required, optional


def _aliases(names: tuple[str, ...]) -> dict[str, str]:
    """Local name -> what it refers to: ``"segment=segment.j5"`` -> ``{"segment": "segment.j5"}``;
    a plain name refers to itself."""
    out = {}
    for entry in names:
        local, _, target = entry.removesuffix("?").partition("=")
        out[local] = target or local
    return out


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline.

    - ``name``: the stage's folder in the run directory and its name in plans and hooks.
    - ``run(call) -> value``: computes the artifact from a :class:`StageCall`.
    - ``inputs``: artifacts it reads, by the name a stage provides them under; ``"align?"``
      marks an optional input (``None`` when that stage is skipped); a required input that is
      skipped skips this stage too. ``"segment=segment.j5"`` reads what ``segment.j5`` provides
      under the local name ``segment`` (one run function serves every branch of a fan-out).
    - ``settings``: settings it reads: a core section (``"selection"``), one key
      (``"masks.source"``), or ``"device"`` (the resolved device).
    - ``plugins``: plugin slots it uses (``"aligner"``, ``"mitigators.jtt"``; ``"critic?"``
      optional; ``"critic=critics.gpt4o"`` the slot ``critics.gpt4o`` under the local name
      ``critic``); a required slot that is not configured skips the stage. The slot's whole
      section and the plugin's distribution and version (or code) enter the fingerprint.
    - ``codec``: how the artifact is stored (:mod:`lvlmva.pipeline.codecs`).
    - ``provides``: the name later stages read the artifact under (default: ``name``). A stage
      that refines another's artifact provides it under the same name: a review stage placed
      after "judge" that provides "judge" is what the stages after it read as "judge".
    - ``model`` / ``label``: for a stage that makes a model, its key in results.json
      (``"aligned"``, ``"dfr"``) and the label tables show (``"aligned (oracle critic)"``).
    - ``skip(view) -> reason | None``: why the stage does not run with these settings, beyond
      the unconfigured slots and skipped inputs the orchestrator checks itself.
    - ``check(view, data) -> problems``: checks against the loaded data set before any stage
      computes (a selection larger than the split, group labels a mitigator needs).
    - ``persist``: stored in the run directory (the data set is not: cheap, deterministic).
    - ``refreshable``: ``--refresh`` recomputes it and bypasses caches (paid LVLM answers).
    - ``watch``: files in the run directory, relative to it, that a person edits and the stage
      reads (``review/overrides.json``); their content enters the fingerprint (a missing file
      counts as missing), so an edit recomputes the stage and what reads it.
    - ``validate(view) -> problems``: settings that cannot work for this stage (a critic
      without a judge, a flag the data set cannot satisfy), checked when the pipeline is built,
      before any work (exit 2); also for a stage that is skipped, since a skip may be the problem.
    - ``preflight_samples(view, n) -> int``: how many requests per plugin preflight this stage
      makes for ``n`` alignment samples (a judge reads each of the critic's answers); default n.
    """

    name: str
    run: Callable[[StageCall], Any]
    inputs: tuple[str, ...] = ()
    settings: tuple[str, ...] = ()
    plugins: tuple[str, ...] = ()
    codec: Codec | None = None
    provides: str = ""
    model: str | None = None
    label: str = ""
    summary: str = ""
    skip: Callable[[StageView], str | None] | None = None
    check: Callable[[StageView, Any], list[str]] | None = None
    persist: bool = True
    refreshable: bool = False
    watch: tuple[str, ...] = ()
    validate: Callable[[StageView], list[str]] | None = None
    preflight_samples: Callable[[StageView, int], int] | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name) or self.name in RESERVED_NAMES:
            raise ValueError(
                f"stage name {self.name!r} must be a folder name of lower-case letters, digits, _ "
                f"and - (one '.' allowed), not one of {', '.join(sorted(RESERVED_NAMES))}"
            )
        if not self.provides:
            object.__setattr__(self, "provides", self.name)
        if self.persist and self.codec is None:
            raise ValueError(f"stage {self.name!r} is stored but names no codec")

    @property
    def required_inputs(self) -> tuple[str, ...]:
        return _split_optional(self.inputs)[0]

    @property
    def optional_inputs(self) -> tuple[str, ...]:
        return _split_optional(self.inputs)[1]

    @property
    def input_names(self) -> tuple[str, ...]:
        req, opt = _split_optional(self.inputs)
        return (*req, *opt)

    def input_provider(self, local: str) -> str:
        """The provided name a local input name refers to."""
        return _aliases(self.inputs).get(local, local)

    def slot(self, local: str) -> str:
        """The settings slot a local plugin name refers to (``critic`` -> ``critics.gpt4o``)."""
        return _aliases(self.plugins).get(local, local)

    @property
    def required_plugins(self) -> tuple[str, ...]:
        """The settings slots of the required plugins."""
        return tuple(self.slot(n) for n in _split_optional(self.plugins)[0])

    @property
    def plugin_slots(self) -> tuple[str, ...]:
        """The settings slots of every plugin it uses."""
        req, opt = _split_optional(self.plugins)
        return tuple(self.slot(n) for n in (*req, *opt))


class StageView:
    """What a stage's ``skip`` and ``check`` functions may read: its declared settings and
    plugin slots (whether configured, their classes' capability flags, their options).

    The view a ``validate`` function gets (``declared_only=False``) may read any setting and
    any slot's options: it decides whether the settings can work, not what the stage computes,
    so what it reads need not enter the fingerprint."""

    def __init__(
        self,
        stage: Stage,
        settings: Callable[[str], Any],
        plugin_class: Callable[[str], type | None],
        plugin_options: Callable[[str], Any] | None = None,
        declared_only: bool = True,
        plugin_name: Callable[[str], str | None] | None = None,
    ) -> None:
        self._stage = stage
        self._settings = settings
        self._plugin_class = plugin_class
        self._plugin_options = plugin_options or (lambda _slot: None)
        self._declared_only = declared_only
        self._plugin_name = plugin_name or (lambda _slot: None)

    @property
    def stage(self) -> Stage:
        return self._stage

    def option(self, key: str) -> Any:
        """A declared setting: a section's Options (``"selection"``) or one value
        (``"masks.source"``); a key inside a declared section may be read too."""
        section = key.partition(".")[0]
        if self._declared_only and key not in self._stage.settings and section not in self._stage.settings:
            raise UndeclaredAccess(
                f"stage {self._stage.name!r} reads setting {key!r} but declares only "
                f"{', '.join(self._stage.settings) or '(none)'}"
            )
        return self._settings(key)

    def _slot(self, slot: str) -> str:
        """The settings slot of a declared plugin, asked by its local name or its slot."""
        actual = self._stage.slot(slot)
        if self._declared_only and actual not in self._stage.plugin_slots:
            raise UndeclaredAccess(
                f"stage {self._stage.name!r} uses plugin slot {slot!r} but declares only "
                f"{', '.join(self._stage.plugin_slots) or '(none)'}"
            )
        return actual

    def configured(self, slot: str) -> bool:
        """Whether a plugin slot has a plugin. Any slot may be asked: which roles a run has is
        the shape of the run, not a setting a stage's result depends on (a stage that skips
        without a critic need not recompute when the critic's options change)."""
        return self._plugin_class(self._stage.slot(slot)) is not None

    def plugin_class(self, slot: str) -> type | None:
        return self._plugin_class(self._slot(slot))

    def plugin_options(self, slot: str) -> Any:
        """The validated options of the plugin in a declared slot (``None`` when unset)."""
        return self._plugin_options(self._slot(slot))

    def plugin_name(self, slot: str) -> str | None:
        """The registered name of the plugin in a slot (``"waterbirds"``), for messages; like a
        flag, any slot may be asked."""
        return self._plugin_name(self._stage.slot(slot))

    def flag(self, slot: str, name: str, default: bool = False) -> bool:
        """A capability flag of the plugin class in ``slot``. Flags are static facts about a
        plugin, not settings, so any slot may be asked (the data set's ``has_true_masks``)."""
        cls = self._plugin_class(self._stage.slot(slot))
        return bool(getattr(cls, name, default)) if cls is not None else default


@dataclass(frozen=True)
class InputInfo:
    """What a stage is told about one of its inputs besides its value."""

    stage: str
    model: str | None
    label: str
    seconds: float | None
    details: Mapping[str, Any] | None = None


class StageCall(StageView):
    """What a stage's run function receives: its declared settings, plugins and inputs, and
    the :class:`RunContext` its plugins are given."""

    def __init__(
        self,
        stage: Stage,
        ctx: RunContext,
        settings: Callable[[str], Any],
        plugin_class: Callable[[str], type | None],
        plugin: Callable[[str], Any],
        load: Callable[[str], Any],
        info: Mapping[str, InputInfo],
        failed: Mapping[str, str] | None = None,
        plugin_options: Callable[[str], Any] | None = None,
    ) -> None:
        super().__init__(stage, settings, plugin_class, plugin_options)
        self.ctx = ctx
        self._plugin = plugin
        self._load = load
        self._info = info
        self._failed = dict(failed or {})

    def plugin(self, slot: str) -> Any:
        """The plugin instance in a declared slot (``None`` for an unconfigured optional one)."""
        return self._plugin(self._slot(slot))

    def _input(self, name: str) -> None:
        if name not in self._stage.input_names:
            raise UndeclaredAccess(
                f"stage {self._stage.name!r} reads input {name!r} but declares only "
                f"{', '.join(self._stage.input_names) or '(none)'}"
            )

    def __getitem__(self, name: str) -> Any:
        """A declared input's value, loaded on first use (``None`` when it was skipped, or when
        an optional input failed: see :meth:`failed_inputs`)."""
        self._input(name)
        if name in self._failed:
            return None
        return self._load(name)

    def info(self, name: str) -> InputInfo | None:
        """Which stage provided a declared input, its model key and label, and the seconds it
        took to compute (``None`` when the input was skipped)."""
        self._input(name)
        return self._info.get(name)

    def failed_inputs(self) -> dict[str, str]:
        """Declared optional inputs whose stage failed (or could not run) in this run, with the
        reason: the stage runs without them and may say so."""
        return dict(self._failed)

    def model_inputs(self) -> Iterator[tuple[str, InputInfo]]:
        """(input name, info) of every declared input that is a model and exists, in order."""
        for name in self._stage.input_names:
            info = self._info.get(name)
            if info is not None and info.model is not None:
                yield name, info

    def models(self) -> dict[str, nn.Module]:
        """Model key -> model, for every declared model input that exists, in order."""
        return {info.model: self[name] for name, info in self.model_inputs()}  # type: ignore[misc]

