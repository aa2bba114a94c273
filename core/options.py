"""The schemas of the settings: the core sections' models and the validated result.

- :class:`RunOptions`, :class:`TrainOptions`, :class:`SelectionOptions`,
  :class:`RenderOptions`, :class:`MaskOptions`, :class:`ReportOptions`, :class:`StudyOptions`:
  the core sections (``[run]``, ``[train]``, ...), by name in :data:`CORE_SECTIONS`;
- :data:`SINGLE_ROLES` and :data:`INSTANCE_SECTIONS`: which sections pick plugins;
- :class:`PluginChoice` and :class:`Settings`: what :func:`lvlmva.settings.load_settings`
  returns.

Reading files, the environment and ``--set`` is :mod:`lvlmva.settings`'s work. This module
imports neither the loader nor the registry, so that whatever takes options (training,
selection, rendering, a report) can import it without the plugin machinery; a test checks it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .protocols import ROLES, PluginOptions

__all__ = [
    "RunOptions",
    "TrainOptions",
    "SelectionOptions",
    "RenderOptions",
    "MaskOptions",
    "ReportOptions",
    "StudyOptions",
    "PluginChoice",
    "Settings",
    "CORE_SECTIONS",
    "SINGLE_ROLES",
    "INSTANCE_SECTIONS",
    "PAIRING_KEYS",
    "RESERVED_MODEL_NAMES",
]

#: sections of named instances -> their role (``[mitigators.dfr] plugin = "dfr"``): the roles
#: a run compares. Segmenters, critics, judges and aligners may also be given by a section of
#: the role's name (``[critic]``), the one-instance form; mitigators, evaluators and trackers
#: (``[trackers.mlflow] plugin = "mlflow"``) only by name.
INSTANCE_SECTIONS: dict[str, str] = {
    "segmenters": "segmenter",
    "critics": "critic",
    "judges": "judge",
    "aligners": "aligner",
    "mitigators": "mitigator",
    "evaluators": "evaluator",
    "trackers": "tracker",
}

#: roles picked by a section of the role's name (``[critic] plugin = "oracle"``)
SINGLE_ROLES: tuple[str, ...] = tuple(r for r in ROLES if r not in ("mitigator", "evaluator", "tracker"))

#: keys of a ``[critics.<name>]`` table that are not the plugin's options: which judge reads it
PAIRING_KEYS: dict[str, str] = {"critic": "judge"}

#: model names the pipeline gives its own models; a mitigator instance may not take them
RESERVED_MODEL_NAMES = ("original", "aligned", "true_mask")


# -- core sections --------------------------------------------------------------------------


class RunOptions(PluginOptions):
    """Where and how a run happens."""

    name: str | None = Field(None, description="Run name; the run directory is out_dir/name. Default: the settings file's stem.")
    out_dir: Path = Field(Path("runs"), description="Folder that holds run directories.")
    seed: int = Field(0, description="Seed for torch, numpy, random, data order, backgrounds, GMM init.")
    device: str = Field("auto", description='"auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...')
    cache_dir: Path | None = Field(None, description="User cache (downloaded data, LVLM responses). Default: $XDG_CACHE_HOME/lvlmva or ~/.cache/lvlmva.")
    deterministic: bool = Field(True, description="Ask torch for deterministic kernels (same settings + seed + device = same numbers).")
    checkpoint_every: int = Field(0, ge=0, description="Training, alignment and mitigator loops save a checkpoint into the stage's unfinished folder after every this many epochs (0: none by count); a killed run resumes from it to the same weights. Not part of any fingerprint.")
    checkpoint_minutes: float | None = Field(5.0, ge=0, description="A checkpoint also after any epoch that ends this many minutes after the stage's last one (0: after every epoch).")

    @field_validator("name")
    @classmethod
    def _one_path_component(cls, value: str | None) -> str | None:
        # The run directory is out_dir/name: a name must not lead out of out_dir or into a
        # folder of someone else's.
        if value is None:
            return value
        if not value.strip() or value in (".", "..") or "/" in value or "\\" in value or "\0" in value:
            raise ValueError("must be one folder name: not empty, no '/' or '\\', not '.' or '..'")
        return value

    @field_validator("device")
    @classmethod
    def _device_parses(cls, value: str) -> str:
        # Only the spelling is checked here: whether CUDA is present is known where the run starts.
        if value != "auto":
            import torch

            try:
                torch.device(value)
            except RuntimeError:
                raise ValueError(f"{value!r} is not a torch device (auto, cpu, cuda, cuda:1, mps, ...)") from None
        return value


class TrainOptions(PluginOptions):
    """Training of the original model f (Adam)."""

    epochs: int = Field(3, ge=0, description="Passes over the training split.")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate.")
    batch_size: int = Field(64, ge=1, description="Samples per step.")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay.")
    resident: Literal["auto", "always", "never"] = Field(
        "auto",
        description='Slice tensors held in memory instead of a DataLoader: "auto" when the split fits in memory.',
        json_schema_extra={"fingerprint": False},
    )


class SelectionOptions(PluginOptions):
    """Choice of the alignment samples."""

    strategy: Literal["lowest-entropy", "random", "highest-entropy"] = Field(
        "lowest-entropy", description="Which training samples become alignment samples (predictive entropy of f)."
    )
    n: int = Field(64, ge=1, description="Number of alignment samples.")


class RenderOptions(PluginOptions):
    """Images shown to the Critic."""

    size: int = Field(224, ge=28, description="Minimum side in pixels after nearest-neighbour upscaling.")
    palette: list[str] = Field(
        default_factory=lambda: ["red", "blue", "green", "yellow", "pink", "brown", "grey", "orange", "purple"],
        description="Ordered colour names for clusters 0..J-1 (from lvlmva.rendering.PALETTE).",
    )
    overlay_alpha: float = Field(0.45, ge=0, le=1, description="Opacity of the cluster map in the overlay image.")

    @field_validator("palette")
    @classmethod
    def _known_colours(cls, names: list[str]) -> list[str]:
        from .rendering import palette_for

        palette_for(names)  # raises ValueError naming the unknown or repeated colour
        return names


class MaskOptions(PluginOptions):
    """Correction masks for alignment."""

    source: Literal["verdicts", "true"] = Field(
        "verdicts",
        description='"verdicts": clusters judged "no" (the method); "true": the data set\'s true spurious masks (RRR with true masks, needs no critic or judge).',
    )
    true_mask_reference: bool = Field(
        True,
        description="Also align with the true masks of the same alignment samples, where the data set has them: the true-mask reference to compare against (a reference, not an upper bound: an LVLM-masked model can score above it).",
    )


class ReportOptions(PluginOptions):
    """The report written at the end of a run."""

    enabled: bool = Field(True, description="Write report.md and figures.")
    samples: int = Field(16, ge=0, description="Alignment samples shown in the figure grid.")
    test_images: int = Field(8, ge=0, description="Test images whose attributions are shown before/after alignment.")


#: sbatch options that ``[study] slurm_parameters`` may not set -> the study key that sets them
#: (or who does: submitit writes the job's name, array and log paths)
SLURM_NAMED_PARAMETERS = {
    "partition": "slurm_partition", "time": "slurm_time_min", "cpus-per-task": "slurm_cpus",
    "gpus-per-node": "slurm_gpus", "mem": "slurm_mem_gb", "account": "slurm_account",
    "qos": "slurm_qos", "array": "slurm_array_parallelism", "job-name": "submitit", "output": "slurm_logs",
    "error": "slurm_logs", "nodes": "submitit (one node per cell)", "ntasks-per-node": "submitit (one task per cell)",
}  # fmt: skip


class StudyOptions(PluginOptions):
    """A study: seeds x methods from this settings file (``lvlmva study``, ``nox -s compare``).
    Every method the file configures (the original model, each aligned model: one per aligner
    and segmenter x critic branch, the true-mask references, each ``[mitigators.<name>]``) is
    compared over the seeds, against the baseline and in the families of ``compare`` and
    ``comparisons``; ``lvlmva compose`` ignores this section."""

    name: str | None = Field(None, description="Study name; the study directory is out_dir/name. Default: the first settings file's stem + '_study'.")
    out_dir: Path = Field(Path("studies"), description="Folder that holds study directories.")
    seeds: list[int] = Field(default_factory=lambda: list(range(7)), min_length=1, description="Seeds, one run directory (cell) each; 0..6 as in the paper.")
    executor: Literal["local", "ray", "slurm"] = Field(
        "local",
        description='"local": cells in this machine\'s processes; "ray": cells as Ray tasks (pip install "lvlmva[ray]"); "slurm": cells as one SLURM job array through submitit (pip install "lvlmva[slurm]"; the slurm_* keys).',
    )
    workers: int = Field(1, ge=1, description="Cells run at once by the local executor (1: one after another in this process).")
    address: str | None = Field(None, description='Ray cluster to join ("ray://head:10001", "auto"); None: a local Ray started for the study.')
    threads: int = Field(
        1,
        ge=1,
        description="torch threads per cell. Fixed by the study, not by the executor or the worker count, because torch's results depend on its thread count: the same cell gives the same numbers locally, on Ray and on SLURM.",
    )
    slurm_cluster: Literal["slurm", "local"] = Field(
        "slurm",
        description='Where executor = "slurm" submits its cells (submitit\'s executors): "slurm": the SLURM cluster this machine submits to (sbatch; srun on PATH); "local": submitit\'s local executor, one process per cell on this machine, all at once, to try the settings and the job files without a cluster (the time limit holds; partition, memory and the other sbatch options are not used).',
    )
    slurm_partition: str | None = Field(None, description="SLURM partition of the cells' jobs (sbatch --partition); None: the cluster's default.")
    slurm_time_min: int = Field(60, gt=0, description="Time limit of each cell's job in minutes (sbatch --time); SLURM stops a cell that runs longer, and a rerun resumes it from its finished stages.")
    slurm_cpus: int | None = Field(None, ge=1, description="CPUs per cell (sbatch --cpus-per-task); None: study.threads. At least study.threads.")
    slurm_gpus: int = Field(0, ge=0, description="GPUs per cell (sbatch --gpus-per-node); set [run] device to use them.")
    slurm_mem_gb: float | None = Field(None, gt=0, description="Memory per cell in GB (sbatch --mem); None: the partition's default.")
    slurm_account: str | None = Field(None, description="SLURM account charged for the cells (sbatch --account).")
    slurm_qos: str | None = Field(None, description="SLURM quality of service of the cells (sbatch --qos).")
    slurm_array_parallelism: int | None = Field(None, ge=1, description="At most this many cells run at once (the job array's %N); None: all.")
    slurm_parameters: dict[str, str | int | float] = Field(
        default_factory=dict,
        description='Other sbatch options, name without dashes -> value ({ constraint = "a100", "mail-type" = "END", exclusive = "" }; "": a flag without a value): submitit\'s slurm_additional_parameters. Options that have a key of their own (partition, time, ...) are set there.',
    )
    slurm_setup: list[str] = Field(default_factory=list, description='Shell lines each job runs before its cell ("module load cuda/12.1"); the cell runs with the Python that started the study.')
    slurm_logs: Path | None = Field(None, description="Folder of submitit's files (each job's stdout, stderr, pickled cell and result); None: <study>/logs/submitit.")
    metrics: list[str] = Field(default_factory=lambda: ["aga", "wga", "accuracy"], min_length=1, description="Metric keys in the table, statistics and plots (declared by the evaluator).")
    evaluator: str | None = Field(None, description="The [evaluators.<name>] instance whose metrics are compared; None: the first.")
    baseline: str = Field("original", description="The model every method is tested against (Wilcoxon signed-rank, paired by seed).")
    alpha: float = Field(0.05, gt=0, lt=1, description="Significance level of the tests.")
    correction: Literal["holm", "none"] = Field(
        "holm",
        description='Correction for testing several methods against the baseline: "holm" (step-down, per data set and metric) or "none" (each test on its own, as the paper reports them). With 7 seeds the smallest p is 2/128, so Holm over m methods cannot fall below m x 0.0156: stats.md says when that floor lies above alpha.',
    )

    compare: list[Literal["aligners", "critics", "segmenters"]] = Field(
        default_factory=list,
        description='Families of comparisons between aligned models besides the baseline, each Holm-corrected over itself per data set and metric: "aligners" pairs the aligned models with the same segmenter and critic (the same branch, or both true masks) and different aligners; "critics" those with the same aligner and segmenter and different critic/judge pairs; "segmenters" those with the same aligner and critic and different segmenters. The parts of a key are read from the settings, not by splitting it at its dots.',
    )
    comparisons: list[tuple[str, str]] = Field(
        default_factory=list,
        description='Pairs of model keys compared with each other (first minus second), one family Holm-corrected over itself: [["aligned.rrr.j5.oracle", "aligned.masked.j5.oracle"]]. A key the settings do not produce stops the study before any cell runs.',
    )

    @field_validator("name")
    @classmethod
    def _one_folder(cls, value: str | None) -> str | None:
        return RunOptions._one_path_component(value)

    @model_validator(mode="after")
    def _slurm_resources(self) -> StudyOptions:
        if self.executor != "slurm":
            return self
        if self.slurm_cpus is not None and self.slurm_cpus < self.threads:
            raise ValueError(
                f"slurm_cpus = {self.slurm_cpus} is fewer than threads = {self.threads}: each cell runs torch "
                "with study.threads threads; ask for at least as many CPUs, or leave slurm_cpus out (it is then threads)"
            )
        named = {k.replace("_", "-").lstrip("-"): k for k in self.slurm_parameters}
        taken = {key: option for key, option in SLURM_NAMED_PARAMETERS.items() if key in named}
        if taken:
            which = ", ".join(f"{named[k]!r} (use {option})" for k, option in sorted(taken.items()))
            raise ValueError(f"slurm_parameters sets what a study key sets or submitit sets itself: {which}")
        return self

    @field_validator("compare")
    @classmethod
    def _each_family_once(cls, value: list[str]) -> list[str]:
        twice = sorted({f for f in value if value.count(f) > 1})
        if twice:
            raise ValueError(f"names a family twice: {', '.join(twice)}")
        return value

    @field_validator("comparisons")
    @classmethod
    def _distinct_pairs(cls, value: list[tuple[str, str]]) -> list[tuple[str, str]]:
        seen: set[frozenset[str]] = set()
        for first, second in value:
            if first == second:
                raise ValueError(f"compares {first!r} with itself")
            if frozenset((first, second)) in seen:
                raise ValueError(f"lists the pair {first!r}, {second!r} twice")
            seen.add(frozenset((first, second)))
        return value


CORE_SECTIONS: dict[str, type[PluginOptions]] = {
    "run": RunOptions,
    "train": TrainOptions,
    "selection": SelectionOptions,
    "render": RenderOptions,
    "masks": MaskOptions,
    "report": ReportOptions,
    "study": StudyOptions,
}


@dataclass(frozen=True)
class PluginChoice:
    """The plugin a settings slot picked and its validated options. ``slot`` is where it was
    picked: a role's section (``"critic"``) or a named instance (``"mitigators.dfr"``)."""

    role: str
    name: str
    options: PluginOptions
    slot: str = ""
    #: for a critic: the slot of the judge that reads it (``"judge"``, ``"judges.rules"``)
    judge: str | None = None

    def __post_init__(self) -> None:
        if not self.slot:
            object.__setattr__(self, "slot", self.role)

    @property
    def instance(self) -> str | None:
        """The instance name of a named instance (``"dfr"``), else ``None``."""
        _, sep, name = self.slot.partition(".")
        return name if sep else None

    def as_dict(self) -> dict[str, Any]:
        out = {"plugin": self.name, **self.options.model_dump(mode="json")}
        if self.judge is not None and "." in self.judge:  # the pairing as it was written
            out["judge"] = self.judge.partition(".")[2]
        return out


@dataclass(frozen=True)
class Settings:
    """Validated, composed settings of one run.

    - ``core``: the core sections and the sections of plugin stages, by name.
    - ``plugins``: every plugin picked, by slot (``"critic"``, ``"mitigators.dfr"``), in the
      order of the roles and, within an instance section, of the file.
    """

    source: Path | None
    core: dict[str, PluginOptions]
    plugins: dict[str, PluginChoice]

    @property
    def run(self) -> RunOptions:
        return self.core["run"]  # type: ignore[return-value]

    @property
    def train(self) -> TrainOptions:
        return self.core["train"]  # type: ignore[return-value]

    @property
    def selection(self) -> SelectionOptions:
        return self.core["selection"]  # type: ignore[return-value]

    @property
    def render(self) -> RenderOptions:
        return self.core["render"]  # type: ignore[return-value]

    @property
    def masks(self) -> MaskOptions:
        return self.core["masks"]  # type: ignore[return-value]

    @property
    def report(self) -> ReportOptions:
        return self.core["report"]  # type: ignore[return-value]

    @property
    def study(self) -> StudyOptions:
        return self.core["study"]  # type: ignore[return-value]

    def instances(self, role: str) -> dict[str, PluginChoice]:
        """The named instances of ``role`` (``"mitigator"``, ``"evaluator"``): name -> choice."""
        return {c.instance: c for c in self.plugins.values() if c.role == role and c.instance}  # type: ignore[misc]

    def choices(self, role: str) -> list[PluginChoice]:
        """Every plugin of ``role``, the one-instance section or the named instances, in order."""
        return [c for c in self.plugins.values() if c.role == role]

    def section(self, name: str) -> dict[str, Any] | None:
        """A core section or a plugin slot as plain JSON-able data (``None`` when unset)."""
        if name in self.core:
            return self.core[name].model_dump(mode="json")
        choice = self.plugins.get(name)
        return None if choice is None else choice.as_dict()

    def options_model(self, name: str) -> type[PluginOptions]:
        """The Options model behind a core section or a plugin slot."""
        if name in self.core:
            return type(self.core[name])
        return type(self.plugins[name].options)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, options in self.core.items():
            out[name] = options.model_dump(mode="json")
        for slot, choice in self.plugins.items():
            section, _, instance = slot.partition(".")
            if instance:
                out.setdefault(section, {})[instance] = choice.as_dict()
            else:
                out[section] = choice.as_dict()
        return out

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(_drop_none(self.as_dict()))

    @property
    def run_name(self) -> str:
        if self.run.name:
            return self.run.name
        return self.source.stem if self.source is not None else "run"


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def paired_judge(named: Any, judges: Sequence[str]) -> str | None:
    """The slot of the judge a critic reads: the ``[judges.<named>]`` its ``judge`` key names,
    else the run's only judge; ``None`` when neither decides (the loader says why)."""
    if named is not None:
        return f"judges.{named}" if isinstance(named, str) else None
    return judges[0] if len(judges) == 1 else None
