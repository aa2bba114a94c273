"""Shared fixtures. Third-party plugins are never autoloaded in the test suite: only this
project's own entry point is read, so what else is installed cannot change results."""

from __future__ import annotations

import os

os.environ["LVLMVA_DISABLE_PLUGIN_AUTOLOAD"] = "1"

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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
