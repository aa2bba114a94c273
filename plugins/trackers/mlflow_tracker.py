"""MLflow: one MLflow run per lvlmva run, by default in a file store under the run directory."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from lvlmva.protocols import PluginOptions, TrackedRun

INSTALL = 'pip install "lvlmva[tracking]" (or mlflow / mlflow-skinny)'

#: MLflow's limits: params per batch call, metrics per batch call
_PARAMS_PER_CALL, _METRICS_PER_CALL = 100, 1000


class MlflowTracker:
    """Logs the run's settings as parameters, every training loop's per-epoch records as metric
    histories (step = epoch), the final metrics, and report.md, results.json and the figures as
    artifacts, through ``mlflow.tracking.MlflowClient``."""

    class Options(PluginOptions):
        tracking_uri: str | None = Field(None, description='MLflow tracking URI ("http://mlflow:5000", "sqlite:///mlflow.db", "file:///path/mlruns"); None: a file store in the run directory\'s mlruns/ (a study\'s cells share the study folder\'s mlruns/). View it with: MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri <that folder> (MLflow 3 opens file stores only with that variable).')
        experiment: str | None = Field(None, description="MLflow experiment name; None: the run's name (a study's name for its cells, so that each cell is one MLflow run of one experiment).")
        timeout: float = Field(5.0, gt=0, description="Seconds a tracking server has to answer the health check at the start; a server that does not answer is reported and the run goes on without it.")

    optional_imports: ClassVar[dict[str, str]] = {"mlflow.tracking": INSTALL}

    def __init__(self, options: Options) -> None:
        self.options = options
        self._client: Any = None
        self._run_id: str | None = None

    def start(self, run: TrackedRun) -> None:
        uri = self.options.tracking_uri
        if uri is None:
            uri = (run.store_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 keeps its file store behind this switch; a local store is this plugin's default
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        elif uri.startswith(("http://", "https://")):
            self._check_server(uri)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        name = self.options.experiment or run.experiment
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(name)
            except Exception:  # a study's other cell made it at the same time
                experiment = client.get_experiment_by_name(name)
                if experiment is None:
                    raise
                experiment_id = experiment.experiment_id
        else:
            experiment_id = experiment.experiment_id
        created = client.create_run(experiment_id, run_name=run.name, tags={"lvlmva.run_dir": str(run.run_dir)})
        self._client, self._run_id = client, created.info.run_id
        params = [Param(k, v[:6000]) for k, v in sorted(run.params.items())]
        for i in range(0, len(params), _PARAMS_PER_CALL):
            client.log_batch(self._run_id, params=params[i : i + _PARAMS_PER_CALL])

    def _check_server(self, uri: str) -> None:
        # MlflowClient retries a server that is down for minutes; one short request says it first
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=self.options.timeout):
                pass
        except urllib.error.HTTPError:
            pass  # it answered
        except (OSError, ValueError) as exc:
            raise ConnectionError(f"MLflow server {uri} does not answer ({getattr(exc, 'reason', exc)})") from None

    def log_metrics(self, metrics: dict[str, float], step: int | None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(_key(k), v, now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(rows), _METRICS_PER_CALL):
            self._client.log_batch(self._run_id, metrics=rows[i : i + _METRICS_PER_CALL])

    def log_artifact(self, path: Path, name: str) -> None:
        folder = str(Path(name).parent.as_posix())
        self._client.log_artifact(self._run_id, str(path), None if folder == "." else folder)

    def finish(self, status: str) -> None:
        self._client.set_terminated(self._run_id, "FINISHED" if status == "ok" else "FAILED")


def _key(name: str) -> str:
    # MLflow names take letters, digits, _ - . / and spaces
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)
