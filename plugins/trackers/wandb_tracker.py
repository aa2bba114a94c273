"""Weights & Biases: offline runs in the run directory by default (``wandb sync`` uploads them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from lvlmva.protocols import PluginOptions, TrackedRun

INSTALL = 'pip install "lvlmva[wandb]" (or wandb)'


class WandbTracker:
    """Logs the settings as the run's config, every training loop's per-epoch records (with
    ``epoch`` as their step metric), the final metrics in the run's summary and report.md,
    results.json and the figures as files. Offline by default: nothing leaves the machine until
    ``wandb sync <run dir>/wandb/offline-run-*``."""

    class Options(PluginOptions):
        project: str | None = Field(None, description="W&B project; None: the run's name (a study's name for its cells).")
        entity: str | None = Field(None, description="W&B entity (user or team); None: the default of the logged-in account.")
        mode: Literal["offline", "online", "disabled"] = Field("offline", description='"offline": files under the run directory\'s wandb/, uploaded later with wandb sync; "online": needs WANDB_API_KEY in the environment.')

    optional_imports: ClassVar[dict[str, str]] = {"wandb": INSTALL}

    def __init__(self, options: Options) -> None:
        self.options = options
        self._run: Any = None
        self._steps: set[str] = set()

    def start(self, run: TrackedRun) -> None:
        import wandb

        self._run = wandb.init(
            project=self.options.project or run.experiment.replace("/", "-"),
            entity=self.options.entity,
            name=run.name,
            group=run.experiment if run.store_dir != run.run_dir else None,
            dir=str(run.run_dir),
            mode=self.options.mode,
            config=run.params,
            reinit="create_new",
        )

    def log_metrics(self, metrics: dict[str, float], step: int | None) -> None:
        if step is None:
            self._run.summary.update(metrics)
            return
        for name in metrics:  # each stage's curves count epochs on their own axis
            prefix = name.rpartition("/")[0]
            if prefix not in self._steps:
                self._steps.add(prefix)
                self._run.define_metric(f"{prefix}/epoch")
                self._run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/epoch")
        prefixes = {name.rpartition("/")[0] for name in metrics}
        self._run.log({**metrics, **{f"{p}/epoch": step for p in prefixes}})

    def log_artifact(self, path: Path, name: str) -> None:
        self._run.save(str(path), base_path=str(path.parent.parent if "/" in name else path.parent), policy="now")

    def finish(self, status: str) -> None:
        self._run.finish(exit_code=0 if status == "ok" else 1)
