"""Shared fixtures. Third-party plugins are never autoloaded in the test suite: only this
project's own entry point is read, so what else is installed cannot change results."""

from __future__ import annotations

import os

os.environ["LVLMVA_DISABLE_PLUGIN_AUTOLOAD"] = "1"

import contextlib  # noqa: E402
import io  # noqa: E402
import threading  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from lvlmva.protocols import RunContext  # noqa: E402


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded numpy generator, fresh per test."""
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)


@pytest.fixture
def ctx(tmp_path: Path) -> RunContext:
    """A CPU run context in a temporary run directory."""
    stage = tmp_path / "stage"
    stage.mkdir()
    return RunContext(
        seed=0,
        device=torch.device("cpu"),
        run_dir=tmp_path,
        stage_dir=stage,
        cache_dir=tmp_path / "cache",
    )


@pytest.fixture(scope="session")
def tiny_lvlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LLaVA model saved once per session (loads with from_pretrained)."""
    from lvlmva.testing.tiny_lvlm import build_tiny_lvlm

    return build_tiny_lvlm(tmp_path_factory.mktemp("tiny-lvlm"), seed=0)


@pytest.fixture(scope="session")
def tiny_causal_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random text-only Llama saved once per session."""
    from lvlmva.testing.tiny_lvlm import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-causal-lm"), seed=0)


@contextlib.contextmanager
def _torch_state_kept() -> Iterator[None]:
    """Restore what a pipeline run changes process-wide (it seeds and asks torch for
    deterministic kernels), so that later tests see the state they expect."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    state = torch.get_rng_state()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_rng_state(state)
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


@pytest.fixture
def torch_global_state() -> Iterator[None]:
    """Torch's process-wide state (seed, deterministic kernels) restored after the test."""
    with _torch_state_kept():
        yield


@pytest.fixture(scope="module")
def module_torch_state() -> Iterator[None]:
    """Torch's process-wide state restored after the module, for module-scoped fixtures that
    run a pipeline."""
    with _torch_state_kept():
        yield


# -- the small DecoyMNIST run the review tests stop at the judge --------------------------------

#: the scripted critic with three answers per sample, wrong at random three times in ten
SCRIPTED_CRITIC = """[critic]
plugin = "scripted"
samples = 3
error_rate = 0.3"""

NO_REPORT = """[report]
enabled = false"""


#: two segmenters (J=3, J=4) x two critics read by the one judge: branches j3.scripted,
#: j3.oracle, j4.scripted and j4.oracle
BRANCH_SEGMENTERS = {"j3": {"plugin": "ppeps-wgm", "num_clusters": 3}, "j4": {"plugin": "ppeps-wgm", "num_clusters": 4}}
BRANCH_CRITICS = {"scripted": {"plugin": "scripted", "samples": 3, "error_rate": 0.3}, "oracle": {"plugin": "oracle"}}


def _write_review_settings(
    folder: Path, *, seed: int = 0, n: int = 6, critic: str = SCRIPTED_CRITIC, report: str = NO_REPORT, branches: bool = False
) -> Path:
    """The small DecoyMNIST run of :func:`lvlmva.testing.settings.decoy_mnist_settings` on 300
    training images; ``critic`` and ``report`` are whole sections as text."""
    from lvlmva.testing.settings import decoy_mnist_settings

    path = folder / "settings.toml"
    tables: dict[str, object] = {"critic": critic, "report": report}
    if branches:
        tables = {"segmenter": None, "critic": None, "report": report, "segmenters": BRANCH_SEGMENTERS, "critics": BRANCH_CRITICS}
    text = decoy_mnist_settings(folder / "cache", run={"seed": seed}, dataset={"train_size": 300}, selection={"n": n}, **tables)
    path.write_text(text, encoding="utf-8")
    return path


def _compose(settings: Path, run_dir: Path, *extra: str) -> tuple[int, str, str]:
    from lvlmva.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["compose", str(settings), "--out", str(run_dir), *extra])
    return code, out.getvalue(), err.getvalue()


def _compose_until_judge(root: Path, *extra: str, **settings: object) -> tuple[Path, str, str]:
    from lvlmva.cli import EXIT_OK

    code, out, err = _compose(_write_review_settings(root, **settings), root / "run", "--until", "judge", *extra)
    assert code == EXIT_OK, err
    return root / "run", out, err


@contextlib.contextmanager
def _serving(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def review_settings() -> Callable[..., Path]:
    """``review_settings(folder, seed=0, n=6, critic=SCRIPTED_CRITIC, report=NO_REPORT,
    branches=False)``: ``folder/settings.toml`` of the small DecoyMNIST run, its cache in
    ``folder/cache``; ``branches``: two segmenters (j3, j4) x two critics (scripted, oracle)."""
    return _write_review_settings


@pytest.fixture(scope="session")
def compose() -> Callable[..., tuple[int, str, str]]:
    """``compose(settings, run_dir, *extra)``: ``lvlmva compose`` in this process; its exit
    code, stdout and stderr (where the stage lines go)."""
    return _compose


@pytest.fixture(scope="session")
def compose_until_judge() -> Callable[..., tuple[Path, str, str]]:
    """``compose_until_judge(root, *extra, **settings)``: the small DecoyMNIST run (settings as
    for ``review_settings``, written to ``root/settings.toml``) composed into ``root/run`` with
    ``--until judge``; fails the test unless it exits 0; the run directory, stdout, stderr."""
    return _compose_until_judge


@pytest.fixture(scope="session")
def serving():
    """``with serving(server):`` the review server answers from a daemon thread inside the
    block; it is shut down and its socket closed after."""
    return _serving


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
