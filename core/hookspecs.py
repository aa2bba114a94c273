"""Hook specifications of lvlmva: the whole plugin surface in one module.

A plugin module implements any of these with ``@lvlmva.hookimpl`` and is found through the entry
point group ``lvlmva`` (``[project.entry-points.lvlmva] myplugin = "my_package.plugin"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .registry import PluginRegistry

PROJECT = "lvlmva"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def lvlmva_register(registry: PluginRegistry) -> None:
    """Register plugin factories: call ``registry.add(role, name, factory)`` for each plugin,
    where ``factory`` is a class or a lazy ``"module:attr"`` string (imported only when a run
    uses it, so a run with the OpenAI critic never imports transformers)."""


@hookspec
def lvlmva_stage_started(stage: str, run_dir: Path, fingerprint: str) -> None:
    """A pipeline stage starts computing (not called for stages loaded from a previous run)."""


@hookspec
def lvlmva_stage_finished(stage: str, run_dir: Path, status: str, seconds: float) -> None:
    """A pipeline stage ended; ``status`` is ``"computed"``, ``"reused"``, ``"skipped"`` or
    ``"failed"``; ``seconds`` is its wall time (0 for reused and skipped stages)."""


@hookspec
def lvlmva_run_finished(run_dir: Path, results: dict[str, Any], status: str) -> None:
    """The whole run ended; ``status`` is ``"ok"`` or ``"failed"``; ``results`` is the content of
    ``results.json`` (empty when the run failed before evaluation)."""
