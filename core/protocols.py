"""The roles a plugin can fill, as ``typing.Protocol`` classes.

A plugin is a class with:

- ``Options``: a pydantic model of its settings (the keys of its settings section besides
  ``plugin``); ``Options`` rejects unknown keys.
- capability flags as class attributes (documented per role below);
- ``__init__(self, options)``: takes a validated ``Options`` instance;
- the role's method(s).

The pipeline checks capability flags before it calls a plugin. Work is batched: a role method
receives a whole alignment set, never one sample per call.

Any plugin may also define ``preflight(self, samples: int) -> list[str]``: problems that would
stop it later, found before any work starts (an unset API-key variable, a request estimate past
a budget). ``samples`` is the number of alignment samples the run will ask about. The pipeline
calls it (``lvlmva validate`` too) for the plugins of every stage it cannot reuse, and exits 2
listing what it returned.

Any plugin may define ``check_data(self, data: SpuriousDataset) -> list[str]`` too: problems with
the loaded data set that would stop it (an empty group cell SUBG cannot subsample, a validation
split without a group DFR tunes on). The pipeline calls it once the data set is loaded and before
anything trains, and exits 2 listing what it returned. Likewise ``check_model(self, model) ->
list[str]``: problems with the model's architecture (a layer name it lacks), asked of the untrained
model built for the data set's input shape.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from .records import (
    AlignmentSet,
    Critique,
    CritiqueRequest,
    Segmentation,
    SpuriousDataset,
    Verdicts,
)

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from .progress import ProgressBar
    from .training import Trainer

__all__ = [
    "DatasetError",
    "PluginOptions",
    "RunContext",
    "ROLES",
    "DatasetProvider",
    "ModelFactory",
    "Attributor",
    "Segmenter",
    "Critic",
    "Judge",
    "Aligner",
    "Mitigator",
    "Evaluator",
    "Metric",
    "Figure",
    "Tracker",
]


class DatasetError(ValueError):
    """The user's data cannot be used as it is (a missing or unreadable image, an unknown label,
    a mask of the wrong size, a folder that is not laid out as the provider expects). A provider
    raises it with a message that names the files; the run stops with exit 2 before anything
    trains, and nothing computed before is lost."""


class PluginOptions(BaseModel):
    """Base class for every plugin's ``Options``: unknown keys are errors, values are checked
    on assignment, and the model is frozen so a plugin cannot change its settings at run time.

    Numbers are checked strictly, in every field of every subclass (inside lists, tuples,
    tables and unions too): ``inf`` and ``nan`` are refused for a float, and a boolean given
    where a number is asked for (``epochs = true``) is refused instead of being read as 1. A
    field where infinity means "no limit" says so with ``Field(allow_inf_nan=True)`` and keeps
    ``nan`` and ``-inf`` out with a bound (``gt=0``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: type[BaseModel], handler: Any) -> Any:
        # pydantic's lax mode reads True as 1 for an int, a float and a number literal, and
        # pydantic has no switch against that alone (strict mode would refuse a list for a
        # tuple too): each such check of this model's fields gets a bool check in front.
        return cls._bools_refused(handler(source))

    #: core schema keys that hold the schemas of parts of a value
    _SCHEMA_PARTS: ClassVar[tuple[str, ...]] = (
        "schema", "items_schema", "keys_schema", "values_schema", "choices", "fields", "steps",
        "python_schema", "json_schema", "lax_schema", "strict_schema", "extras_schema",
    )  # fmt: skip

    @classmethod
    def _bools_refused(cls, schema: Any) -> Any:
        """Core schema ``schema`` with every int, float and number-literal check refusing a
        bool first (a copy where something changed, ``schema`` itself where nothing did). Other
        models' schemas are left to them: a nested PluginOptions does the same for its fields."""
        from pydantic_core import SchemaError, SchemaValidator, core_schema

        if isinstance(schema, (list, tuple)):
            parts = [cls._bools_refused(part) for part in schema]
            return schema if all(a is b for a, b in zip(parts, schema, strict=True)) else type(schema)(parts)
        if not isinstance(schema, dict):
            return schema
        kind = schema.get("type")
        if kind in ("int", "float") or (kind == "literal" and cls._number_literal(schema["expected"])):
            return core_schema.no_info_before_validator_function(
                cls._refuse_bool(cls._numbers_allowed(schema)), schema
            )
        if kind == "model" and schema.get("cls") is not cls:
            return schema
        out = dict(schema)
        for key in cls._SCHEMA_PARTS:
            part = schema.get(key)
            if key in ("fields", "choices") and isinstance(part, dict):  # by name or tag
                out[key] = {name: cls._bools_refused(sub) for name, sub in part.items()}
            elif key == "choices" and isinstance(part, list):
                # a union names its failing branch in an error's location: a wrapped branch keeps
                # the name it had (``float``, not ``function-before[refuse_bool(), float]``)
                choices = []
                for choice in part:
                    sub, label = choice if isinstance(choice, tuple) else (choice, None)
                    new = cls._bools_refused(sub)
                    if new is not sub and label is None:
                        try:
                            label = SchemaValidator(sub).title
                        except SchemaError:  # it refers to definitions held elsewhere
                            pass
                    choices.append(new if label is None else (new, label))
                out[key] = choices
            elif part is not None:
                out[key] = cls._bools_refused(part)
        changed = any(out[key] != schema[key] for key in cls._SCHEMA_PARTS if key in schema)
        return out if changed else schema

    @staticmethod
    def _number_literal(expected: Sequence[Any]) -> bool:
        # Literal[1, 3] takes True as 1; Literal[True, 1] asks for the bool on purpose
        return any(isinstance(v, (int, float)) for v in expected) and not any(isinstance(v, bool) for v in expected)

    @staticmethod
    def _numbers_allowed(schema: dict[str, Any]) -> str:
        """What a number check takes, in words: ``an integer >= 0``, ``1 or 3``."""
        if schema["type"] == "literal":
            return " or ".join(repr(v) for v in schema["expected"])
        words = "an integer" if schema["type"] == "int" else "a number"
        bounds = [f"{sign} {schema[key]}" for key, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if key in schema]
        return " ".join([words, " and ".join(bounds)]).strip()

    @staticmethod
    def _refuse_bool(allowed: str) -> Callable[[Any], Any]:
        from pydantic_core import PydanticCustomError

        def refuse_bool(value: Any) -> Any:
            if isinstance(value, bool):
                raise PydanticCustomError("bool_not_number", "a boolean is not a number", {"expected": allowed})
            return value

        return refuse_bool


@dataclass
class RunContext:
    """What the pipeline hands a plugin besides its inputs.

    - ``seed``: the run's seed; derive sub-seeds with :meth:`generator`.
    - ``device``: where models and tensors should live for heavy work.
    - ``run_dir``: the run directory; ``stage_dir``: this stage's folder in it (write files a
      stage produces there: they are committed atomically together with the stage).
    - ``cache_dir``: the user cache (responses, downloaded data), shared between runs.
    - ``refresh``: ignore caches of paid or slow results (``--refresh``).
    - ``progress``: show progress bars (False when not a TTY or when quiet); a long loop draws
      one with :meth:`progress_bar`, which reads it.
    - ``stage``: the pipeline stage running, and ``attempt`` an id of this computation of it
      (added to every logged JSON line as ``run_stage`` and ``run_attempt``, so that lines of a
      replaced or interrupted computation can be dropped once a new artifact is committed).
    - ``checkpoints``: where this stage's training loops save and find their checkpoints
      (:class:`lvlmva.checkpoints.Checkpoints`; None: no checkpoints, as outside a pipeline).
    - ``trackers``: the run's experiment trackers (:class:`lvlmva.tracking.TrackerSet`; None
      outside a pipeline): every line logged to ``metrics.jsonl`` goes to them too, so each
      training loop's per-epoch records reach MLflow, TensorBoard, ... as they are written.
    """

    seed: int
    device: torch.device
    run_dir: Path
    stage_dir: Path
    cache_dir: Path
    refresh: bool = False
    progress: bool = False
    stage: str = ""
    attempt: str = ""
    checkpoints: Any = None  # lvlmva.checkpoints.Checkpoints | None
    trackers: Any = None  # lvlmva.tracking.TrackerSet | None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def generator(self, salt: str) -> torch.Generator:
        """A CPU generator seeded from the run seed and a fixed string, so that each use of
        randomness is independent of the order in which others ran."""
        import hashlib

        digest = hashlib.sha256(f"{self.seed}:{salt}".encode()).digest()
        g = torch.Generator()
        g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        return g

    def log_jsonl(self, name: str, record: dict[str, Any]) -> None:
        """Append one JSON line to ``run_dir/name`` (``metrics.jsonl``, ``transcripts.jsonl``).
        Thread-safe; flushed per line so a killed run keeps what it logged; registered secrets
        are redacted from every string; never written through a symbolic link."""
        from .atomic import append_line
        from .secrets import redact_json

        if self.stage:
            record = {"run_stage": self.stage, "run_attempt": self.attempt, **record}
        record = redact_json(record)
        line = json.dumps(record, default=str, sort_keys=True)
        with self._lock:
            append_line(self.run_dir / name, line)
        if name == "metrics.jsonl" and self.trackers is not None:  # the one per-epoch hook
            self.trackers.record(record)

    def progress_bar(self, description: str, total: int | None, *, completed: int = 0, transient: bool = False) -> AbstractContextManager[ProgressBar]:
        """A progress bar for a long loop (epochs, batches, requests), drawn only when
        ``progress`` is on: ``with ctx.progress_bar("my-aligner", total=n) as bar: ...
        bar.advance()``. The handle counts also when nothing is drawn; ``bar.grow(k)`` makes
        the total larger; ``completed`` starts a resumed loop part-way; ``transient`` removes
        the bar when the loop ends (:func:`lvlmva.progress.progress_bar`)."""
        from .progress import progress_bar

        return progress_bar(self.progress, description, total, completed=completed, transient=transient)


@runtime_checkable
class DatasetProvider(Protocol):
    """Loads a data set with its spurious structure.

    Flags: ``has_groups`` (group labels are provided), ``has_true_masks`` (true spurious masks
    are provided for train and test).
    """

    Options: ClassVar[type[PluginOptions]]
    has_groups: ClassVar[bool]
    has_true_masks: ClassVar[bool]

    def load(self, ctx: RunContext) -> SpuriousDataset: ...


@runtime_checkable
class ModelFactory(Protocol):
    """Builds an untrained classifier for ``input_shape`` ``(C, H, W)`` and ``num_classes``.

    The returned module maps float32 ``[B, C, H, W]`` to logits ``[B, num_classes]`` and
    exposes ``features(x) -> [B, D]`` and ``head: nn.Linear`` (DFR retrains the head).
    """

    Options: ClassVar[type[PluginOptions]]

    def build(self, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module: ...


@runtime_checkable
class Attributor(Protocol):
    """Explains a model: ``attribute`` returns float32 ``[B, C, H, W]`` attributions of
    ``inputs`` ``[B, C, H, W]`` for class ``targets`` ``[B]``; ``reference_pool`` ``[N, C, H, W]``
    is training data the attributor may draw a background from (seeded by ``ctx``).

    Flags: ``needs_background`` (uses ``reference_pool``).
    """

    Options: ClassVar[type[PluginOptions]]
    needs_background: ClassVar[bool]

    def attribute(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        reference_pool: torch.Tensor,
        ctx: RunContext,
    ) -> torch.Tensor: ...


@runtime_checkable
class Segmenter(Protocol):
    """Splits attribution maps ``[B, C, H, W]`` (channels are summed) into J regions."""

    Options: ClassVar[type[PluginOptions]]

    def segment(self, attributions: torch.Tensor, ctx: RunContext) -> Segmentation: ...


@runtime_checkable
class Critic(Protocol):
    """Discusses each sample's clusters against its class description, in free text.

    Returns one ``Critique`` per request, in order; a request that could not be answered gets a
    ``Critique`` with ``failure`` set (never an exception that loses the other answers).

    Flags: ``needs_true_masks`` (reads ``CritiqueRequest.true_mask``: an upper bound, not a
    real critic; the pipeline gives the true masks only to such a critic and tables say so).
    """

    Options: ClassVar[type[PluginOptions]]
    needs_true_masks: ClassVar[bool]

    def critique(self, requests: Sequence[CritiqueRequest], ctx: RunContext) -> list[Critique]: ...


@runtime_checkable
class Judge(Protocol):
    """Turns critiques into one yes/no verdict per cluster colour.

    Returns one ``Verdicts`` per critique, in order; an answer that cannot be validated is a
    ``Verdicts`` with ``failure`` set, never a guess.
    """

    Options: ClassVar[type[PluginOptions]]

    def judge(self, critiques: Sequence[Critique], ctx: RunContext) -> list[Verdicts]: ...


@runtime_checkable
class Aligner(Protocol):
    """Fine-tunes ``model`` so that it stops using the masked regions.

    ``masks`` is bool ``[N, H, W]`` for the samples of ``alignment`` (same order); the returned
    module is a new, aligned model (the input model is left unchanged).
    """

    Options: ClassVar[type[PluginOptions]]

    def align(
        self,
        model: nn.Module,
        data: SpuriousDataset,
        alignment: AlignmentSet,
        masks: torch.Tensor,
        ctx: RunContext,
    ) -> nn.Module: ...


@runtime_checkable
class Mitigator(Protocol):
    """A shortcut-mitigation baseline (DFR, JTT, SUBG, ...): returns a mitigated model.

    ``original`` is a copy of the trained model ``f`` (free to change); ``trainer`` is a
    :class:`lvlmva.training.Trainer` bound to the run's ``[train]`` settings, device, seeds and
    progress: ``trainer.new_model()`` is a fresh untrained model and ``trainer.fit(...)`` trains
    exactly as the original was trained, on a split, an index list (repeats allowed) or with
    sample weights, with per-epoch callbacks for validation-based selection.

    Several instances may run in one run (``[mitigators.dfr]``, ``[mitigators.jtt]``); each is
    a stage of its own and its instance name labels its model.

    Flags: ``needs_groups`` (uses group labels of train/val), ``needs_validation`` (uses the
    validation split). Both are checked on the loaded data set before any training.
    """

    Options: ClassVar[type[PluginOptions]]
    needs_groups: ClassVar[bool]
    needs_validation: ClassVar[bool]

    def mitigate(
        self,
        original: nn.Module,
        trainer: Trainer,
        data: SpuriousDataset,
        ctx: RunContext,
    ) -> nn.Module: ...


@dataclass(frozen=True)
class Metric:
    """One number (or one table of numbers) an evaluator reports, described for every table
    that shows it: the CLI summary, report.md, sweeps and studies read these declarations.

    - ``key``: the key in the evaluator's result dict.
    - ``title``: the column or table title.
    - ``higher_is_better``: ``True``/``False``, or ``None`` for counts and other values that are
      neither.
    - ``format``: a format spec for one value (``".4f"``, ``"d"``, ``".1%"``).
    - ``summary``: shown in the one-line CLI summary of each model.
    - ``description``: one sentence for the report's legend.

    A value may be a number, ``None`` (not computable for this model; shown as a dash), or a
    mapping from names to numbers (a per-group table: shown as a table of its own).
    """

    key: str
    title: str
    higher_is_better: bool | None = True
    format: str = ".4f"
    summary: bool = True
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "higher_is_better": self.higher_is_better,
            "format": self.format,
            "summary": self.summary,
            "description": self.description,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Metric:
        return cls(**data)

    def format_value(self, value: Any) -> str:
        """``value`` written with ``format``; a dash for ``None`` or NaN."""
        if value is None or (isinstance(value, float) and value != value):
            return "–"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return str(value)
        try:
            return format(value, self.format)
        except ValueError:  # "d" for a float
            return format(value, ".4f")


@dataclass(frozen=True)
class Figure:
    """A figure an evaluator drew, for report.md to show under the evaluator's section.

    - ``file``: the PNG's path relative to the stage's folder (``ctx.stage_dir``), where the
      evaluator wrote it (``"group_accuracy.png"``); the report shows it as
      ``figures/evaluate.<instance>/<file>``, a name that stays the same from run to run.
    - ``caption``: one or two sentences under the image.
    """

    file: str
    caption: str


@runtime_checkable
class Evaluator(Protocol):
    """Scores a model on a data set: returns a dict of named values (JSON-serialisable).

    ``metrics`` declares the values worth showing (:class:`Metric`: key, title, direction,
    format); tables and summaries are drawn from it. Other keys of the result (counts, notes)
    are kept in results.json but not tabulated. Several instances may run in one run
    (``[evaluators.groups]``, ``[evaluators.corruptions]``), each a stage of its own that scores
    every model of the run.

    ``attribute``, when given, explains a model with the run's attributor:
    ``attribute(model, inputs, targets) -> [B, C, H, W]`` (for attribution-based metrics).

    Flags: ``needs_groups``, ``needs_true_masks``; optionally ``split`` (default ``"test"``), the
    split its metrics are computed on, which every table names.

    ``metrics`` may be an instance attribute when the metrics depend on the options (one per
    corruption asked for); it is read after every model was evaluated. An evaluator may also
    define ``finalize(models: dict[str, dict]) -> dict[str, dict]``: called once with every
    model's values (keys as in results.json: ``"original"``, ``"aligned"``, instance names) to
    add values across models, such as each model's difference to the original. A result key
    ``not_computed`` (``{metric key: reason}``) names what could not be computed and why; the
    report lists it under the evaluator's tables.

    Figures: an evaluator may define ``figures(models: dict[str, dict], labels: dict[str, str],
    ctx) -> Sequence[Figure]``, called once after ``finalize`` with every model's values and
    the models' labels (as tables print them): it writes its PNGs into ``ctx.stage_dir`` and
    returns one :class:`Figure` (file, caption) each. report.md shows them under the
    evaluator's tables; a declared file that is missing is named there as missing.
    """

    Options: ClassVar[type[PluginOptions]]
    metrics: ClassVar[tuple[Metric, ...]]
    needs_groups: ClassVar[bool]
    needs_true_masks: ClassVar[bool]

    def evaluate(
        self,
        model: nn.Module,
        data: SpuriousDataset,
        ctx: RunContext,
        attribute: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, Any]: ...


@dataclass(frozen=True)
class TrackedRun:
    """What a tracker is told when a run starts.

    - ``run_dir``: the run directory; ``store_dir``: where a local store belongs (the run
      directory, or the study's folder for a study's cell, so that every cell logs into one
      store).
    - ``name``: the tracker run's name (the run's name; ``<data set>/seed<k>`` for a study's
      cell); ``experiment``: the experiment (the run's name; the study's name for a cell).
    - ``params``: the run's resolved settings as flat dotted keys (``train.lr``), as text;
      secrets are never among them.
    """

    run_dir: Path
    store_dir: Path
    name: str
    experiment: str
    params: dict[str, str]


@runtime_checkable
class Tracker(Protocol):
    """Sends a run to an experiment tracker (MLflow, TensorBoard, W&B, ...).

    Several may run in one run (``[trackers.<name>] plugin = "mlflow"``). The pipeline calls
    ``start`` once when the run starts, ``log_metrics`` for every per-epoch record of every
    training loop (``step`` = the epoch; names ``<stage>/<key>``, such as ``train/loss`` or
    ``align.rrr/penalty``) and once with the final metrics (``step`` None; names
    ``<model>/<evaluator>/<metric>``), ``log_artifact`` for report.md, results.json and the
    figures (``name``: the path relative to the run directory), and ``finish`` with the run's
    status (``"ok"`` or ``"failed"``). A tracker never fails a run: what it raises is reported
    as a warning (standard error and ``tracking.json``) and that tracker is not called again.
    Trackers are no part of any stage's fingerprint: adding one recomputes nothing.

    A tracker whose library is optional names it in ``optional_imports`` (module -> install
    line), checked before any work starts (exit 2).
    """

    Options: ClassVar[type[PluginOptions]]

    def start(self, run: TrackedRun) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None) -> None: ...

    def log_artifact(self, path: Path, name: str) -> None: ...

    def finish(self, status: str) -> None: ...


#: role name -> protocol; the names are the settings sections that pick a plugin of that role.
ROLES: dict[str, type] = {
    "dataset": DatasetProvider,
    "model": ModelFactory,
    "attributor": Attributor,
    "segmenter": Segmenter,
    "critic": Critic,
    "judge": Judge,
    "aligner": Aligner,
    "mitigator": Mitigator,
    "evaluator": Evaluator,
    "tracker": Tracker,
}


def check_capabilities(role: str, cls: type) -> list[str]:
    """Names of the capability flags and methods ``cls`` lacks for ``role`` (empty when fine)."""
    proto = ROLES[role]
    missing = []
    for name in getattr(proto, "__protocol_attrs__", None) or _protocol_members(proto):
        if not hasattr(cls, name):
            missing.append(name)
    return missing


def _protocol_members(proto: type) -> set[str]:
    names = set(getattr(proto, "__annotations__", {}))
    names |= {k for k, v in vars(proto).items() if callable(v) and not k.startswith("_")}
    return names


__all__ += ["TrackedRun", "check_capabilities", "Segmentation", "Verdicts", "Critique", "CritiqueRequest"]
