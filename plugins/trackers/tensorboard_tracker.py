"""TensorBoard: event files in the run directory's tensorboard/ folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from lvlmva.protocols import PluginOptions, TrackedRun

INSTALL = 'pip install "lvlmva[tracking]" (or tensorboard)'


class TensorboardTracker:
    """Writes every training loop's per-epoch records as scalars (step = epoch), the final
    metrics as scalars at step 0, the settings as a text summary and report.md as text, with
    torch's ``SummaryWriter``. View with: tensorboard --logdir <run dir>/tensorboard."""

    class Options(PluginOptions):
        log_dir: Path | None = Field(None, description="Folder of the event files; None: tensorboard/ in the run directory (a study's cells: the study folder's tensorboard/<data set>/seed<k>).")

    optional_imports: ClassVar[dict[str, str]] = {"tensorboard": INSTALL, "torch.utils.tensorboard": INSTALL}

    def __init__(self, options: Options) -> None:
        self.options = options
        self._writer: Any = None

    def start(self, run: TrackedRun) -> None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = self.options.log_dir or run.store_dir / "tensorboard"
        if run.store_dir != run.run_dir:  # a study's cell: one folder per cell
            log_dir = log_dir / run.name
        self._writer = SummaryWriter(log_dir=str(log_dir))
        table = "\n".join(["| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in sorted(run.params.items()))])
        self._writer.add_text("settings", table, 0)

    def log_metrics(self, metrics: dict[str, float], step: int | None) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(name if step is not None else f"final/{name}", value, step or 0)
        self._writer.flush()

    def log_artifact(self, path: Path, name: str) -> None:
        if name == "report.md":  # figures and tables stay files: TensorBoard shows text, not files
            self._writer.add_text("report", path.read_text(encoding="utf-8"), 0)

    def finish(self, status: str) -> None:
        self._writer.add_text("status", status, 0)
        self._writer.close()
