"""Study cells on the toy pipeline (fast): a failed cell leaves its traceback (secrets redacted)
in the study's logs/."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import pipeline_toys  # noqa: E402

from lvlmva.cli import EXIT_FAILED, EXIT_OK, main  # noqa: E402
from lvlmva.registry import reset_plugins  # noqa: E402
from lvlmva.secrets import REDACTED  # noqa: E402

SECRET = "sk-cell-toy-4f9c2a"
KEY_ENV = "LVLMVA_CELL_TOY_KEY"

#: a mitigator that can kill its own process, fail with a secret in its message, or wait for
#: a file; a module of its own so that spawned study workers import it by name
CELL_TOYS = '''
import copy
import os
import signal
import time
from pathlib import Path

from pydantic import Field

from lvlmva.hookspecs import hookimpl
from lvlmva.protocols import PluginOptions
from lvlmva.secrets import register_secret


class CellToyOptions(PluginOptions):
    kill_on_seeds: list[int] = Field(default_factory=list, description="SIGKILL the process on these seeds")
    fail_on_seeds: list[int] = Field(default_factory=list, description="raise, naming the secret, on these seeds")
    key_env: str = Field("", description="variable holding a key, registered as a secret before failing")
    flag: str = Field("", description="written before a kill; the other seeds wait for it")


class CellToy:
    Options = CellToyOptions
    needs_groups = False
    needs_validation = False

    def __init__(self, options):
        self.options = options

    def mitigate(self, original, trainer, data, ctx):
        o = self.options
        if ctx.seed in o.kill_on_seeds:
            Path(o.flag).write_text("dying")
            os.kill(os.getpid(), signal.SIGKILL)
        if ctx.seed in o.fail_on_seeds:
            key = os.environ[o.key_env]
            register_secret(key)  # as a plugin registers the key it read
            raise RuntimeError(f"cell toy refused the key {key}")
        if o.flag:  # still running when the other worker dies
            deadline = time.monotonic() + 60
            while not Path(o.flag).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)
        return copy.deepcopy(original)


@hookimpl
def lvlmva_register(registry):
    registry.add("mitigator", "cell-toy", CellToy)
'''


@pytest.fixture
def toys(tmp_path, monkeypatch, torch_global_state):
    """The toy pipeline's plugins and the cell toy, importable here and in spawned workers."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "study_cell_toys.py").write_text(textwrap.dedent(CELL_TOYS))
    paths = [str(plugins), str(Path(__file__).parent)]
    monkeypatch.syspath_prepend(str(plugins))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("LVLMVA_PLUGINS", "pipeline_toys,study_cell_toys")
    monkeypatch.setenv(KEY_ENV, SECRET)
    reset_plugins()
    yield
    reset_plugins()
    sys.modules.pop("study_cell_toys", None)


def _settings(tmp_path: Path, seeds: list[int], **cell: object) -> Path:
    options = "".join(f"{k} = {json.dumps(v)}\n" for k, v in cell.items())
    text = pipeline_toys.TOY_SETTINGS.replace("[run]\n", f'[run]\ncache_dir = "{(tmp_path / "cache").as_posix()}"\n', 1)
    text += f'\n[mitigators.cell]\nplugin = "cell-toy"\n{options}\n[study]\nseeds = {seeds}\nmetrics = ["accuracy"]\n'
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return path


def _log(study: Path) -> list[dict]:
    return [json.loads(line) for line in (study / "cells.jsonl").read_text().splitlines()]


# -- a failed cell's traceback -----------------------------------------------------------------


def test_a_failed_cell_writes_its_traceback_redacted_and_names_the_file(tmp_path, toys, capsys):
    settings = _settings(tmp_path, [0, 1], fail_on_seeds=[1], key_env=KEY_ENV)
    study = tmp_path / "study"
    assert main(["study", str(settings), "--out", str(study)]) == EXIT_FAILED
    err = capsys.readouterr().err
    error_file = study / "logs" / "tiny-seed1.error.txt"
    assert "[2/2] tiny seed 1: failed" in err and f"(traceback: {error_file}" in err
    assert "Traceback" not in err  # without --debug the echo names the file only
    text = error_file.read_text()
    assert text.startswith("Traceback (most recent call last):")
    assert "stage 'mitigate.cell' failed:" in text and "in mitigate" in text
    assert f"RuntimeError: cell toy refused the key {REDACTED}" in text
    assert SECRET not in text and SECRET not in err
    assert SECRET not in (study / "cells.jsonl").read_text() and SECRET not in (study / "table.md").read_text()
    assert _log(study)[-1]["error_file"] == str(error_file)
    assert not (study / "logs" / "tiny-seed0.error.txt").exists()

    # the cell succeeds later: its old traceback is not left to mislead
    _settings(tmp_path, [0, 1])
    assert main(["study", str(settings), "--out", str(study)]) == EXIT_OK
    assert not error_file.exists()


def test_a_worker_process_redacts_the_secrets_its_plugins_registered(tmp_path, toys, capsys, monkeypatch):
    """The key is registered in the worker only (this process never sees it as a secret): the
    traceback and the reason are redacted there."""
    from lvlmva.secrets import redact

    worker_only = "sk-worker-only-81d3e7"
    monkeypatch.setenv(KEY_ENV, worker_only)
    settings = _settings(tmp_path, [0, 1], fail_on_seeds=[0, 1], key_env=KEY_ENV)
    study = tmp_path / "study"
    assert main(["study", str(settings), "--out", str(study), "--set", "study.workers=2"]) == EXIT_FAILED
    err = capsys.readouterr().err
    for seed in (0, 1):
        text = (study / "logs" / f"tiny-seed{seed}.error.txt").read_text()
        assert f"RuntimeError: cell toy refused the key {REDACTED}" in text and worker_only not in text
    assert worker_only not in err and worker_only not in (study / "cells.jsonl").read_text()
    assert redact(worker_only) == worker_only  # not registered here: redacted in the worker


def test_debug_echoes_the_traceback_and_stage_error_files_are_named(tmp_path, toys, monkeypatch):
    from lvlmva.pipeline import Pipeline, StageFailed
    from lvlmva.study.runner import run_study

    raised: list[StageFailed] = []
    run = Pipeline.run

    def keep(self, *args, **kwargs):
        try:
            return run(self, *args, **kwargs)
        except StageFailed as exc:
            if not getattr(exc, "error_files", None):  # until lvlmva.pipeline names them itself
                exc.error_files = {"mitigate.cell": self.run_dir / "logs" / "mitigate.cell.error.txt"}
            raised.append(exc)
            raise

    monkeypatch.setattr(Pipeline, "run", keep)
    settings = _settings(tmp_path, [0], fail_on_seeds=[0], key_env=KEY_ENV)
    lines: list[str] = []
    summary = run_study([settings], out=tmp_path / "study", echo=lines.append, debug=True)
    assert summary["failed"] == 1
    echo = "\n".join(lines)
    (exc,) = raised
    assert exc.error_files
    for stage, path in exc.error_files.items():
        assert f"stage {stage}: {path}" in echo
    assert "Traceback (most recent call last):" in echo and "in mitigate" in echo
    assert f"RuntimeError: cell toy refused the key {REDACTED}" in echo and SECRET not in echo
    record = _log(tmp_path / "study")[-1]
    assert record["stage_error_files"] == {k: str(v) for k, v in exc.error_files.items()}


def test_a_cell_that_cannot_start_writes_its_traceback(tmp_path, toys, capsys):
    from lvlmva.pipeline import RunDirectory

    settings, study = _settings(tmp_path, [0]), tmp_path / "study"
    argv = ["study", str(settings), "--out", str(study)]
    assert main(argv) == EXIT_OK
    capsys.readouterr()
    # another setting: the cell runs again, and finds its run directory held by another process
    with RunDirectory(study / "cells" / "tiny" / "seed0").lock():
        assert main([*argv, "--set", "aligner.shift=0.02"]) == EXIT_FAILED
    err = capsys.readouterr().err
    error_file = study / "logs" / "tiny-seed0.error.txt"
    assert "RunDirectoryBusy" in err and f"(traceback: {error_file})" in err
    assert "RunDirectoryBusy" in error_file.read_text() and "Traceback (most recent call last):" in error_file.read_text()
