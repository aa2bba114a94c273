"""The orchestrator behind ``lvlmva compose``: planning, fingerprints and the loop.

A stage's fingerprint hashes what it declares: the settings it reads, its plugin slots (whole
sections, with the distribution and version of each plugin) and, for each input, the content
hash of that input's stored artifact. So a changed setting recomputes that stage and whatever
reads it, and a recomputed stage whose artifact came out different (``--refresh`` got new LVLM
answers) recomputes exactly the stages that read it, while one that came out the same leaves
them alone.

The loop goes through the stages in order: skipped (no plugin, or a required input skipped),
reused (stored with the same fingerprint and intact), or computed. A stage that fails is
recorded and the stages that do not depend on it still run; the run then ends with
:class:`StageFailed` naming every failure, and the next run resumes from what was kept.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_error
from ..checkpoints import CHECKPOINTS, EVENTS, Checkpoints
from ..protocols import DatasetError, RunContext
from ..records import SpuriousDataset
from ..registry import PluginRegistry, get_plugin_manager, get_registry
from ..secrets import redact
from ..settings import Settings
from ..version import __version__
from .codecs import DecodeContext
from .environment import GlobalTorchState, environment_info, isolated_rng, stage_seed
from .errors import (
    ConfigurationError,
    StageFailed,
    StageInputError,
    describe_failure,
    format_traceback,
)
from .fingerprints import section_for_fingerprint
from .rundir import RunDirectory, StageRecord, sha256_file
from .sources import CodeFingerprints
from .stage import InputInfo, Stage, StageCall, StageView
from .stages import build_stages

__all__ = ["Pipeline", "StageOutcome", "ARTIFACT_VERSION", "default_cache_dir"]

#: bump when a built-in stage's artifact format changes, so that old run directories recompute
ARTIFACT_VERSION = 2

#: a token for an input whose content is not known yet (planning)
_UNKNOWN = object()


def default_cache_dir() -> Path:
    import os

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lvlmva"


@dataclass
class StageOutcome:
    """What a run did (or a plan would do) with one stage: ``computed``, ``reused``,
    ``skipped``, ``failed``, ``blocked`` (an input failed) or, in a plan, ``pending``."""

    name: str
    status: str
    fingerprint: str | None
    seconds: float = 0.0
    reason: str = ""


@dataclass
class _Decision:
    status: str  # skipped | reused | pending | blocked
    fingerprint: str | None = None
    reason: str = ""
    record: StageRecord | None = None


@dataclass
class _State:
    """What the loop (or a plan) knows about the stages so far."""

    status: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, Any] = field(default_factory=dict)
    records: dict[str, StageRecord] = field(default_factory=dict)


class Pipeline:
    """Runs the stages of one settings file in one run directory."""

    #: the run's experiment trackers while :meth:`run` runs (lvlmva.tracking.TrackerSet)
    _trackers: Any = None

    def __init__(
        self,
        settings: Settings,
        run_dir: Path,
        *,
        refresh: bool = False,
        progress: bool = False,
        registry: PluginRegistry | None = None,
        echo: Callable[[str], None] = print,
        until: str | None = None,
        recompute: Iterable[str] = (),
        debug: bool = False,
    ) -> None:
        from ..training import resolve_device

        self.settings = settings
        self.run_dir = Path(run_dir)
        self.refresh = refresh
        self.debug = debug
        self.progress = progress
        self.registry = registry or get_registry()
        self.echo = echo
        run = settings.run
        self.cache_dir = Path(run.cache_dir) if run.cache_dir else default_cache_dir()
        try:
            self.device = resolve_device(run.device)
        except ValueError as exc:
            raise ConfigurationError(f"run.device = {run.device!r}: {exc}") from None
        self.stages = build_stages(settings, self.registry)
        self._by_name = {s.name: s for s in self.stages}
        if until is not None and until not in self._by_name:
            # a stage that fans out (judge -> judge.j5.gpt4o, ...): stop after its last instance
            fanned = [s.name for s in self.stages if s.name.startswith(f"{until}.")]
            if not fanned:
                raise ConfigurationError(f"--until {until}: this run has no stage {until!r}; its stages: {', '.join(self._by_name)}")
            until = fanned[-1]
        self.until = until
        self._width = max(len(s.name) for s in self.stages)
        self._providers = self._resolve_inputs()
        self._plugins: dict[str, Any] = {}
        self._values: dict[str, Any] = {}
        self._rundir: RunDirectory | None = None
        self._error_files: dict[str, Path] = {}
        self._nested = 0.0  # seconds of unstored stages computed inside the stage being computed
        self.outcomes: dict[str, StageOutcome] = {}
        self._check_combination()
        self.skipped = self._skip_reasons()
        if until is not None and self.skipped[until] is not None:
            raise ConfigurationError(f"--until {until}: that stage does not run with these settings ({self.skipped[until]})")
        self.recompute = self._recompute_set(recompute)
        self._build_plugins()
        self._code = CodeFingerprints(self.settings, self.registry)
        self._static = {s.name: self._static_fingerprint(s) for s in self.stages}
        self._preflight()

    # -- the stage graph ----------------------------------------------------------------------
    def _resolve_inputs(self) -> dict[str, dict[str, str]]:
        """Stage -> {input name -> the stage providing it}: the last stage before it that
        provides that name."""
        out: dict[str, dict[str, str]] = {}
        seen: dict[str, str] = {}
        names: set[str] = set()
        problems = []
        for stage in self.stages:
            if stage.name in names:
                problems.append(f"two stages are named {stage.name!r}")
            names.add(stage.name)
            out[stage.name] = {}
            for name in stage.input_names:
                provided = stage.input_provider(name)
                if provided in seen:
                    out[stage.name][name] = seen[provided]
                else:
                    problems.append(f"stage {stage.name!r} reads {provided!r}, which no stage before it provides")
            seen[stage.provides] = stage.name
        if problems:
            raise ConfigurationError("\n".join(problems))
        return out

    def _plugin_class(self, slot: str) -> type | None:
        choice = self.settings.plugins.get(slot)
        return None if choice is None else self.registry.get(choice.role, choice.name)

    def plugin(self, slot: str) -> Any:
        """The plugin instance of a slot (``None`` when unset), made once per run."""
        if slot not in self._plugins:
            cls = self._plugin_class(slot)
            self._plugins[slot] = None if cls is None else cls(self.settings.plugins[slot].options)
        return self._plugins[slot]

    def _option(self, key: str) -> Any:
        if key == "device":
            return self.device
        section, _, sub = key.partition(".")
        options = self.settings.core[section]
        return getattr(options, sub) if sub else options

    def _view(self, stage: Stage) -> StageView:
        return StageView(stage, self._option, self._plugin_class, self._plugin_options, plugin_name=self._plugin_name)

    def _settings_view(self, stage: Stage) -> StageView:
        """The view of ``validate`` and ``preflight_samples``: any setting, any slot (they decide
        whether and how much work can be done, not what a stage computes)."""
        return StageView(stage, self._option, self._plugin_class, self._plugin_options, declared_only=False, plugin_name=self._plugin_name)

    def _plugin_name(self, slot: str) -> str | None:
        choice = self.settings.plugins.get(slot)
        return None if choice is None else choice.name

    def _plugin_options(self, slot: str) -> Any:
        choice = self.settings.plugins.get(slot)
        return None if choice is None else choice.options

    # -- checks before any work -----------------------------------------------------------------
    def _check_combination(self) -> None:
        """Each stage's ``validate``: the settings that cannot work (roles that must come
        together, capability flags the data set cannot satisfy), before any work."""
        problems: list[str] = []
        for stage in self.stages:
            if stage.validate is not None:
                problems += [p for p in stage.validate(self._settings_view(stage)) if p not in problems]
        if problems:
            raise ConfigurationError("\n".join(problems))

    def _skip_reasons(self) -> dict[str, str | None]:
        """Why each stage will not run with these settings (``None`` when it runs). Static:
        it depends on the settings alone."""
        out: dict[str, str | None] = {}
        after = False
        for stage in self.stages:
            reason = f"after --until {self.until}" if after else None
            after = after or stage.name == self.until
            for slot in stage.required_plugins if reason is None else ():
                if slot not in self.settings.plugins:
                    reason = f"no [{slot}] plugin configured"
                    break
            if reason is None and stage.skip is not None:
                reason = stage.skip(self._view(stage))
            if reason is None:
                for name in stage.required_inputs:
                    if out[self._providers[stage.name][name]] is not None:
                        reason = f"needs {name}, which is skipped"
                        break
            out[stage.name] = reason
        return out

    def _recompute_set(self, names: Iterable[str]) -> frozenset[str]:
        """The stages ``--recompute`` names and every stage that reads them, directly or not
        (their inputs are recomputed, so are they, even when the new artifact comes out the
        same)."""
        names = [n for n in names if n]
        unknown = [n for n in names if n not in self._by_name]
        if unknown:
            raise ConfigurationError(
                f"--recompute {','.join(unknown)}: this run has no such stage; its stages: {', '.join(self._by_name)}"
            )
        idle = [n for n in names if self.skipped[n] is not None]
        if idle:
            raise ConfigurationError(
                "--recompute " + "; ".join(f"{n}: that stage does not run with these settings ({self.skipped[n]})" for n in idle)
            )
        forced = set(names)
        for stage in self.stages:
            if any(provider in forced for provider in self._providers[stage.name].values()):
                forced.add(stage.name)
        return frozenset(forced)

    def _who(self, slot: str) -> str:
        choice = self.settings.plugins[slot]
        entry = self.registry.entry(choice.role, choice.name)
        return f"[{slot}] {choice.role} plugin {choice.name!r} ({entry.distribution} {entry.version})"

    def import_problems(self, slots: Iterable[str] | None = None) -> list[str]:
        """Import the optional modules the plugins of ``slots`` (default: every configured
        one) declare in ``optional_imports``; what cannot be imported, with the install line."""
        problems = []
        for slot in self.settings.plugins if slots is None else slots:
            cls = self._plugin_class(slot)
            for module, install in dict(getattr(cls, "optional_imports", None) or {}).items():
                try:
                    importlib.import_module(module)
                except Exception as exc:  # an ImportError, or a library that fails as it loads
                    problems.append(
                        f"{self._who(slot)} needs the module {module!r}, which cannot be imported "
                        f"({type(exc).__name__}: {exc}); install it with: {install}"
                    )
        return problems

    def _build_plugins(self) -> None:
        """Build every configured plugin from its options before any work: one that cannot be
        built stops the run with exit 2 naming it, its distribution and what was expected."""
        problems: list[str] = []
        for slot in self.settings.plugins:
            cls = self._plugin_class(slot)
            who = self._who(slot)
            try:
                self.plugin(slot)
            except Exception as exc:  # the plugin's own constructor: name it and what it raised
                self._plugins.pop(slot, None)
                problems.append(
                    f"{who} cannot be built from its options: {describe_failure(exc)} "
                    f"(a plugin is built as {cls.__qualname__}(options), options being its validated {cls.__qualname__}.Options)"
                )
        if problems:
            raise ConfigurationError("\n".join(problems))

    def _preflight(self) -> None:
        """Ask the plugins of every stage that cannot be reused whether they can do their work
        (an API key that is set, requests within a budget): a problem stops the run before any
        work, with exit 2."""
        plan = {o.name: o.status for o in self.plan()}
        samples = self.settings.selection.n
        # a configured tracker's library is checked whatever runs: it logs every run
        problems: list[str] = self.import_problems(c.slot for c in self.settings.choices("tracker"))
        asked: set[str] = set()
        for stage in self.stages:
            if plan.get(stage.name) != "pending":
                continue
            # the plugins a stage works with; an optional slot is read for its name or flags
            for slot in stage.required_plugins:
                if slot in asked or slot not in self.settings.plugins:
                    continue
                asked.add(slot)
                problems += self.import_problems([slot])
                check = getattr(self.plugin(slot), "preflight", None)
                if callable(check):
                    asks = samples if stage.preflight_samples is None else stage.preflight_samples(self._settings_view(stage), samples)
                    problems += list(check(asks))
        if problems:
            raise ConfigurationError("\n".join(problems))

    # -- fingerprints ----------------------------------------------------------------------------
    def _fingerprint_setting(self, key: str) -> Any:
        """A setting as the fingerprint sees it (:func:`section_for_fingerprint`), the device as
        resolved ("auto" and "cpu" are the same on a machine without CUDA)."""
        if key == "device":
            return self.device.type
        section, _, sub = key.partition(".")
        value = section_for_fingerprint(self.settings.options_model(section), self.settings.section(section) or {})
        return value if not sub else value.get(sub)

    def _static_fingerprint(self, stage: Stage) -> dict[str, Any]:
        plugins = {}
        for slot in stage.plugin_slots:
            choice = self.settings.plugins.get(slot)
            if choice is None:
                plugins[slot] = None
                continue
            value = section_for_fingerprint(type(choice.options), choice.as_dict())
            plugins[slot] = {**value, "__source__": self._code.release(choice.role, choice.name)}
            code = self._code.plugin(slot)
            if code is not None:  # code that can change under the same version: its source counts
                plugins[slot]["__code__"] = code.sha256
        added = next((e for e in self.registry.stages() if e.stage is stage), None)
        out = {
            "stage": stage.name,
            # a stage a plugin added is the plugin's code: its version counts like a plugin's
            "source": None if added is None else f"{added.distribution} {added.version}",
            "artifact_version": ARTIFACT_VERSION,
            "lvlmva": __version__,
            "codec": getattr(stage.codec, "name", None),
            "settings": {key: self._fingerprint_setting(key) for key in stage.settings},
            "plugins": plugins,
        }
        code = self._code.stage(stage)
        if code is not None:
            out["code"] = code.sha256
        return out

    def _fingerprint(self, stage: Stage, tokens: dict[str, Any]) -> str | None:
        inputs = {}
        for name, provider in self._providers[stage.name].items():
            token = tokens.get(provider)
            if token is _UNKNOWN:
                return None
            inputs[name] = token
        watched = {}
        for rel in stage.watch:
            path = self.run_dir / rel
            try:
                watched[rel] = sha256_file(path) if path.is_file() else "missing"
            except OSError as exc:
                raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}") from None
        blob = json.dumps({**self._static[stage.name], "inputs": inputs, **({"watch": watched} if watched else {})}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    # -- deciding ------------------------------------------------------------------------------
    def _decide(self, stage: Stage, state: _State, rundir: RunDirectory | None) -> _Decision:
        reason = self.skipped[stage.name]
        if reason is not None:
            return _Decision("skipped", reason=reason)
        for name, provider in self._providers[stage.name].items():
            # a required input that failed blocks the stage; an optional one is left out (a
            # failed baseline must not keep the others from being evaluated)
            if state.status.get(provider) in ("failed", "blocked") and name in stage.required_inputs:
                what = "failed" if state.status[provider] == "failed" else "could not run"
                return _Decision("blocked", reason=f"needs {name}, which {what}")
        fp = self._fingerprint(stage, state.tokens)
        if fp is None:
            return _Decision("pending")  # after the stages it reads: its fingerprint is not known yet
        if not stage.persist:
            return _Decision("pending", fp)
        if self.refresh and stage.refreshable:
            return _Decision("pending", fp, reason="--refresh")
        if stage.name in self.recompute:
            return _Decision("pending", fp, reason="--recompute")
        record = rundir.record(stage.name) if rundir is not None else None
        if record is None or record.fingerprint != fp:
            return _Decision("pending", fp)
        problem = rundir.verify(record)  # type: ignore[union-attr]
        if problem is not None:
            return _Decision("pending", fp, reason=problem)
        return _Decision("reused", fp, record=record)

    def plan(self) -> list[StageOutcome]:
        """What a run would do now, stage by stage: reuse, compute (``pending``) or skip. The
        data set (not stored) counts as pending only when a later stage must compute."""
        rundir = RunDirectory(self.run_dir) if (self.run_dir / ".lvlmva-run").is_file() else None
        state = _State()
        out = []
        for stage in self.stages:
            d = self._decide(stage, state, rundir)
            state.status[stage.name] = d.status
            if d.status == "reused":
                state.tokens[stage.name] = d.record.content  # type: ignore[union-attr]
            elif d.status == "skipped":
                state.tokens[stage.name] = None
            elif not stage.persist:
                state.tokens[stage.name] = d.fingerprint
            else:
                state.tokens[stage.name] = _UNKNOWN
            out.append(StageOutcome(stage.name, d.status, d.fingerprint, reason=d.reason))
        if not any(o.status == "pending" for o in out if self._by_name[o.name].persist):
            out = [StageOutcome(o.name, "reused", o.fingerprint) if o.status == "pending" else o for o in out]
        return out

    # -- running --------------------------------------------------------------------------------
    def _context(self, stage: Stage, stage_dir: Path, attempt: str) -> RunContext:
        return RunContext(
            seed=self.settings.run.seed,
            device=self.device,
            run_dir=self.run_dir,
            stage_dir=stage_dir,
            cache_dir=self.cache_dir,
            refresh=self.refresh,
            progress=self.progress,
            stage=stage.name,
            attempt=attempt,
            trackers=self._trackers,
        )

    def _decode_context(self) -> DecodeContext:
        factory = self.plugin("model")

        def build(shape: tuple[int, int, int], classes: int) -> torch.nn.Module:
            with isolated_rng():  # building draws initial weights we then overwrite
                return factory.build(shape, classes)

        return DecodeContext(build_model=build if factory is not None else None)

    def run(self) -> dict[str, Any]:
        """Run every stage; returns the results (the content of results.json). Raises
        :class:`StageFailed` after running what it could when stages failed, and
        :class:`ConfigurationError` (before anything is written) when the loaded data set does
        not fit the settings."""
        hooks = get_plugin_manager().hook
        rundir = RunDirectory.claim(self.run_dir)
        results: dict[str, Any] = {}
        status = "failed"
        saved = GlobalTorchState.save()
        self._state, self._rundir, self._hooks = _State(), rundir, hooks
        self._failures: dict[str, BaseException] = {}
        self._error_files: dict[str, Path] = {}
        try:
            with rundir.lock():
                try:
                    # The data set first when anything computes: its checks (a selection
                    # larger than the split, groups a mitigator needs) stop the run before
                    # the previous results are unpublished or any setting is recorded.
                    plan = self.plan()
                    computes = any(o.status == "pending" for o in plan if self._by_name[o.name].persist)
                    self._preload_data(plan, computes)
                    rundir.write("settings.resolved.toml", self.settings.to_toml())
                    rundir.write("env.json", json.dumps(environment_info(self.device, self._code.record()), indent=2, sort_keys=True))
                    self._start_trackers()
                    # A run that stops early (--until) publishes nothing: it keeps what was
                    # published before unless a stage before the stop is to be recomputed,
                    # which would make those results disagree with the artifacts
                    if self.until is None or computes:
                        rundir.unpublish()
                    self._loop(rundir, hooks)
                    # published also when some stage failed: results.json then names the
                    # failures beside what could be computed without them
                    results = self._publish(rundir)
                    if self._failures:
                        raise StageFailed(self._failures, self.run_dir, self._error_files)
                    status = "ok"
                finally:
                    self._write_timings(rundir)
        finally:
            saved.restore()
            if self._trackers is not None:
                self._trackers.finish(results, status)
                self._trackers = None
            hooks.lvlmva_run_finished(run_dir=self.run_dir, results=results if status == "ok" else {}, status=status)
        return results

    def _start_trackers(self) -> None:
        """Start the run's trackers (``[trackers.<name>]``): one that fails is a warning."""
        from ..tracking import TrackerSet, flat_params, tracked_run

        slots = {c.slot: self.plugin(c.slot) for c in self.settings.choices("tracker")}
        if not slots:
            return
        self._trackers = TrackerSet(slots)
        params = flat_params({k: v for k, v in self.settings.as_dict().items() if k != "trackers"})
        self._trackers.start(tracked_run(self.run_dir, self.settings.run_name, params))

    def _write_timings(self, rundir: RunDirectory) -> None:
        timings = {o.name: {"status": o.status, "seconds": round(o.seconds, 3)} for o in self.outcomes.values()}
        try:
            rundir.write("timings.json", json.dumps(timings, indent=2))
        except OSError as exc:  # said, not raised: an error already on its way must not be hidden
            self.echo(f"  ! {exc.strerror or exc}")  # names the file (write_atomic's errors do)

    def check_data(self) -> str:
        """Load the data set and run every data check (the stages' and plugins' ``check_data``
        and ``check_model``) without a run directory: ``lvlmva validate``. Returns what was
        loaded, in words; raises :class:`ConfigurationError` (exit 2) naming the problems, or
        :class:`StageFailed` when the provider itself fails."""
        self._state, self._hooks = _State(), _NoHooks()
        self._failures, self._error_files = {}, {}
        plan = self.plan()
        unstored = [s for s in self.stages if not s.persist and self.skipped[s.name] is None]
        saved = GlobalTorchState.save()  # seeding the data set switches determinism on
        try:
            self._preload_data(plan, True)
        finally:
            saved.restore()
        if self._failures:
            raise StageFailed(self._failures, self.run_dir)
        parts = []
        for stage in unstored:
            data = self._values.get(stage.name)
            if isinstance(data, SpuriousDataset):
                sizes = ", ".join(
                    f"{name} {len(split.labels)}" for name, split in (("train", data.train), ("val", data.val), ("test", data.test)) if split is not None
                )
                c, h, w = data.input_shape
                parts.append(f"{stage.name}: {sizes} images of {c} x {h} x {w}, {data.num_classes} classes; checked")
        return "; ".join(parts)

    def _preload_data(self, plan: list[StageOutcome], computes: bool) -> None:
        unstored = [s for s in self.stages if not s.persist and self.skipped[s.name] is None]
        stops_at_data = self.until is not None and not self._by_name[self.until].persist
        if not unstored or not (computes or stops_at_data):
            return
        for stage in unstored:
            self._state.tokens[stage.name] = next(o.fingerprint for o in plan if o.name == stage.name)
            try:
                self._value(stage.name)
            except _InputFailed:
                pass  # recorded as that stage's failure; the stages that read it are blocked

    def _loop(self, rundir: RunDirectory, hooks: Any) -> None:
        state = self._state
        for stage in self.stages:
            d = self._decide(stage, state, rundir)
            if d.status == "skipped":
                self._finish(stage, "skipped", None, reason=d.reason)
                state.tokens[stage.name] = None
            elif d.status == "blocked":
                self._finish(stage, "blocked", None, reason=d.reason)
                state.tokens[stage.name] = "failed"
            elif d.status == "reused":
                state.records[stage.name] = d.record  # type: ignore[assignment]
                state.tokens[stage.name] = d.record.content  # type: ignore[union-attr]
                self._finish(stage, "reused", d.fingerprint)
            elif not stage.persist:
                # Not stored (the data set): loaded on first use, in its own slot.
                state.tokens[stage.name] = d.fingerprint
                if stage.name not in self._values and state.status.get(stage.name) != "failed":
                    state.status[stage.name] = "deferred"
            else:
                if d.reason and d.reason not in ("--refresh", "--recompute"):
                    self.echo(f"  ! {stage.name:<{self._width}} {d.reason}: computing it again")
                self._compute(stage, d.fingerprint, rundir, hooks)  # type: ignore[arg-type]

    def _finish(self, stage: Stage, status: str, fp: str | None, seconds: float = 0.0, reason: str = "") -> None:
        self._state.status[stage.name] = status
        self.outcomes[stage.name] = StageOutcome(stage.name, status, fp, seconds, reason)
        name = f"{stage.name:<{self._width}}"
        if status == "skipped":
            self.echo(f"  - {name} skipped: {reason}")
        elif status == "blocked":
            self.echo(f"  x {name} not run: {reason}")
        elif status == "reused":
            self.echo(f"  = {name} reused ({(fp or '')[:8]})")
        elif status == "computed":
            self.echo(f"  + {name} computed in {seconds:.1f}s")
        self._hooks.lvlmva_stage_finished(stage=stage.name, run_dir=self.run_dir, status=status, seconds=seconds)

    def _compute(self, stage: Stage, fp: str, rundir: RunDirectory, hooks: Any) -> None:
        """Compute and commit one stored stage; a failure is recorded in ``self._failures``."""
        from ..training import seed_everything

        if self.refresh and stage.refreshable:
            # The old answers no longer count, also when this computation fails: the next run
            # computes the stage again (from the response cache) instead of reusing them.
            rundir.retire(stage.name)
        attempt = uuid.uuid4().hex[:12]
        partial = rundir.begin(stage.name, fp)
        hooks.lvlmva_stage_started(stage=stage.name, run_dir=self.run_dir, fingerprint=fp)
        ctx = self._context(stage, partial, attempt)
        run = self.settings.run
        ctx.checkpoints = checkpoints = Checkpoints(
            partial / CHECKPOINTS, run.checkpoint_every, run.checkpoint_minutes,
            log=lambda record: ctx.log_jsonl(EVENTS, record),
        )  # fmt: skip
        started = time.perf_counter()
        self._nested = 0.0
        try:
            seed_everything(stage_seed(self.settings.run.seed, stage.name), self.settings.run.deterministic)
            value = stage.run(self._call(stage, ctx))
            stage.codec.encode(value, partial)  # type: ignore[union-attr]
            # What cannot be read back is not committed; the value kept is what a reuse loads.
            value = stage.codec.decode(partial, self._decode_context())  # type: ignore[union-attr]
            seconds = time.perf_counter() - started - self._nested  # the data set's loading is its own
            record = rundir.commit(stage.name, fp, stage.codec.name, seconds)  # type: ignore[union-attr]
        except (KeyboardInterrupt, SystemExit, _DataProblems, StageInputError):
            rundir.abandon(stage.name)
            raise
        except _InputFailed as exc:  # the data set failed to load: recorded there, this one waits
            rundir.abandon(stage.name)
            self._finish(stage, "blocked", fp, reason=f"needs {exc.stage}, which failed")
            self._state.tokens[stage.name] = "failed"
            return
        except Exception as exc:  # recorded with the stage's name; the stages that need it are blocked
            rundir.abandon(stage.name)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                exc = write_error(Path(exc.filename) if exc.filename else partial, exc)  # a plugin's own write: name the place
            self._fail(stage, fp, time.perf_counter() - started - self._nested, exc)
            return
        if checkpoints.resumed:
            self.echo(f"  ~ {stage.name}: resumed {len(checkpoints.resumed)} training loop(s) from checkpoints ({EVENTS})")
        if checkpoints.unreadable:
            self.echo(f"  ! {stage.name}: {len(checkpoints.unreadable)} checkpoint(s) could not be read; those loops started over ({EVENTS})")
        self._values[stage.name] = value
        self._state.records[stage.name] = record
        self._state.tokens[stage.name] = record.content
        try:
            rundir.forget_logs(stage.name, keep_attempt=attempt)
            rundir.remove_log(f"{stage.name}.error.txt")  # an earlier failure's, now answered
        except OSError as exc:  # the artifact is committed; only old log lines stay behind
            self.echo(f"  ! {stage.name}: cannot rewrite the logs: {exc.strerror or exc}")
        self._finish(stage, "computed", fp, seconds)

    def _fail(self, stage: Stage, fp: str | None, seconds: float, exc: BaseException) -> None:
        self._failures[stage.name] = exc
        self._state.status[stage.name] = "failed"
        self._state.tokens[stage.name] = "failed"
        self.outcomes[stage.name] = StageOutcome(stage.name, "failed", fp, seconds, reason=redact(str(exc)))
        where = self._write_error(stage, fp, exc)
        self.echo(f"  ! {stage.name:<{self._width}} failed after {seconds:.1f}s: {describe_failure(exc)}" + (f" (traceback: {where})" if where else ""))
        if self.debug:
            print(format_traceback(exc), file=sys.stderr, end="", flush=True)
        self._hooks.lvlmva_stage_finished(stage=stage.name, run_dir=self.run_dir, status="failed", seconds=seconds)

    def _write_error(self, stage: Stage, fp: str | None, exc: BaseException) -> Path | None:
        """The failure's full traceback in ``logs/<stage>.error.txt``: the file a developer
        opens (the CLI names it); ``None`` when it could not be written (said, not raised: the
        failure itself must reach the user)."""
        if self._rundir is None:
            return None
        text = (
            f"stage: {stage.name}\nfingerprint: {fp}\nlvlmva: {__version__}\n"
            f"time: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n\n{format_traceback(exc)}"
        )
        try:
            path = self._rundir.write_log(f"{stage.name}.error.txt", text)
        except OSError as exc2:
            self.echo(f"  ! cannot write the traceback of {stage.name}: {exc2.strerror or exc2}")
            return None
        self._error_files[stage.name] = path
        return path

    def _call(self, stage: Stage, ctx: RunContext) -> StageCall:
        info, failed = {}, {}
        for name, provider in self._providers[stage.name].items():
            status = self._state.status.get(provider)
            if status == "skipped":
                continue
            if status in ("failed", "blocked"):
                outcome = self.outcomes.get(provider)
                failed[name] = ("failed" if status == "failed" else "could not run") + (f": {outcome.reason}" if outcome and outcome.reason else "")
                continue
            p = self._by_name[provider]
            record = self._state.records.get(provider)
            details = None
            if record is not None and callable(getattr(p.codec, "details", None)):
                details = p.codec.details(self._rundir.stage_dir(provider))  # type: ignore[union-attr]
            info[name] = InputInfo(provider, p.model, p.label or p.model or "", record.seconds if record else None, details)
        return StageCall(
            stage,
            ctx,
            self._option,
            self._plugin_class,
            self.plugin,
            lambda name: self._value(self._providers[stage.name][name]),
            info,
            failed,
            self._plugin_options,
        )

    def _value(self, name: str) -> Any:
        """A stage's value: from memory, from its artifact, or (the data set) computed now."""
        if name in self._values:
            return self._values[name]
        stage = self._by_name[name]
        if self._state.status.get(name) == "skipped":
            return None
        if self._state.status.get(name) == "failed":
            raise _InputFailed(name)
        if not stage.persist:
            value = self._compute_unstored(stage)
        else:
            value = stage.codec.decode(self._rundir.stage_dir(name), self._decode_context())  # type: ignore[union-attr]
        self._values[name] = value
        return value

    def _compute_unstored(self, stage: Stage) -> Any:
        """The data set: computed in the middle of another stage with its own seed and with the
        random state of that stage kept intact; then the data checks of every stage run."""
        from ..training import seed_everything

        hooks = self._hooks
        fp = self._state.tokens.get(stage.name)
        hooks.lvlmva_stage_started(stage=stage.name, run_dir=self.run_dir, fingerprint=fp)
        started = time.perf_counter()
        try:
            with isolated_rng():
                seed_everything(stage_seed(self.settings.run.seed, stage.name), self.settings.run.deterministic)
                value = stage.run(self._call(stage, self._context(stage, self.run_dir, uuid.uuid4().hex[:12])))
        except DatasetError as exc:  # the user's data: bad input (exit 2), not a failed stage
            raise _DataProblems(f"[{stage.name}] {exc}") from None
        except Exception as exc:  # recorded as the data set's failure, not the stage that asked
            seconds = time.perf_counter() - started
            self._nested += seconds
            self._fail(stage, fp, seconds, exc)
            raise _InputFailed(stage.name) from exc
        seconds = time.perf_counter() - started
        self._nested += seconds
        self._finish(stage, "computed", fp, seconds)
        self._check_data(value)
        return value

    def _check_data(self, data: Any) -> None:
        """Every stage's ``check`` and the ``check_data(data)`` of the plugins it works with,
        on the loaded data set, and their ``check_model(model)`` on the untrained model (a
        Grad-CAM layer the architecture lacks), before anything trains."""
        problems: list[str] = []
        asked: set[str] = set()
        untrained: list[torch.nn.Module] = []
        for stage in self.stages:
            if self.skipped[stage.name] is not None:
                continue
            if stage.check is not None:
                problems += stage.check(self._view(stage), data)
            for slot in stage.required_plugins:
                plugin = self.plugin(slot) if slot not in asked else None
                asked.add(slot)
                check = getattr(plugin, "check_data", None)
                if callable(check):
                    problems += [f"[{slot}] {p}" for p in check(data)]
                check_model = getattr(plugin, "check_model", None)
                if callable(check_model) and self.plugin("model") is not None:
                    if not untrained:  # the architecture, built once with the data set's shape
                        with isolated_rng():
                            untrained.append(self.plugin("model").build(data.input_shape, data.num_classes))
                    problems += [f"[{slot}] {p}" for p in check_model(untrained[0])]
        if problems:
            raise _DataProblems("\n".join(problems))

    # -- published files ----------------------------------------------------------------------
    def _publish(self, rundir: RunDirectory) -> dict[str, Any]:
        """results.json (the results stage's artifact plus settings and timings) and the report."""
        if self._state.status.get("results") not in ("computed", "reused"):
            return {}
        results = dict(self._value("results"))
        # the [study] section says how a study schedules its cells, not what a run computes:
        # left out, so that a cell gives the same results.json whichever executor ran it
        results["settings"] = {k: v for k, v in self.settings.as_dict().items() if k != "study"}
        results["timings"] = {name: round(r.seconds, 3) for name, r in self._state.records.items()}
        report_dir = None
        if self._state.status.get("report") in ("computed", "reused") and (self._value("report") or {}).get("written"):
            report_dir = rundir.stage_dir("report")
        rundir.publish(results, report_dir)
        return results

    # -- sharing stages between run directories --------------------------------------------------
    def adopt(self, source: Path, names: Iterable[str]) -> list[str]:
        """Copy finished stages ``names`` from another run directory into this one where their
        fingerprints, computed for this run, match and their files are intact; returns the
        names copied. Later runs here then reuse them (a sweep computes shared stages once)."""
        import shutil

        src = RunDirectory(Path(source))
        if not (src.path / ".lvlmva-run").is_file():
            return []
        dst = RunDirectory.claim(self.run_dir)
        wanted = set(names)
        state = _State()
        copied = []
        with dst.lock():
            for stage in self.stages:
                d = self._decide(stage, state, dst)
                if d.status == "pending" and stage.persist and stage.name in wanted and d.fingerprint is not None:
                    record = src.record(stage.name)
                    if record is not None and record.fingerprint == d.fingerprint and src.verify(record) is None:
                        partial = dst.begin(stage.name)
                        shutil.copytree(src.stage_dir(stage.name), partial, dirs_exist_ok=True)
                        dst.install(stage.name)
                        copied.append(stage.name)
                        d = _Decision("reused", d.fingerprint, record=record)
                state.status[stage.name] = d.status
                state.tokens[stage.name] = (
                    d.record.content if d.status == "reused" else None if d.status == "skipped"  # type: ignore[union-attr]
                    else d.fingerprint if not stage.persist else _UNKNOWN
                )  # fmt: skip
        return copied


class _NoHooks:
    """Stage events of a check that is not a run (``lvlmva validate``): told to no one."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda **_kwargs: None


class _DataProblems(ConfigurationError):
    """The loaded data set does not fit the settings: the run stops with exit 2 (a
    ConfigurationError raised by a stage's own code is an ordinary stage failure)."""


class _InputFailed(Exception):
    """An unstored input (the data set) failed while another stage asked for it."""

    def __init__(self, stage: str) -> None:
        super().__init__(stage)
        self.stage = stage
