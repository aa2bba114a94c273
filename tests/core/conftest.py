"""Fixtures for the plugin-surface tests: the example third-party plugin (as an installed
distribution or registered in-process) and a clean global plugin state around each use; the toy
pipeline's plugins with a test's own toy module, for studies that start worker processes."""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lvlmva.registry import register_module, reset_plugins

REPO = Path(__file__).resolve().parents[2]
TOY_PROJECT = REPO / "examples" / "third_party_plugin"
TOY_PACKAGE = "lvlmva_toy"


def toy_metadata() -> tuple[str, str, dict[str, str]]:
    """Name, version and ``lvlmva`` entry points of the example plugin, read from its
    pyproject.toml so that the tests and the documented project cannot drift apart."""
    project = tomllib.loads((TOY_PROJECT / "pyproject.toml").read_text())["project"]
    return project["name"], project["version"], dict(project["entry-points"]["lvlmva"])


def write_distribution(
    site: Path, name: str, version: str, entry_points: dict[str, str], package: Path | None = None
) -> Path:
    """Make ``site`` look like a folder pip installed ``name`` into: the package copied next to
    a ``<name>-<version>.dist-info`` with METADATA and entry_points.txt."""
    site.mkdir(parents=True, exist_ok=True)
    if package is not None:
        shutil.copytree(package, site / package.name, ignore=shutil.ignore_patterns("__pycache__"))
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "".join(f"{key} = {value}\n" for key, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[lvlmva]\n{lines}")
    return site


def _forget_modules(prefix: str) -> None:
    for name in [m for m in sys.modules if m == prefix or m.startswith(prefix + ".")]:
        del sys.modules[name]


@pytest.fixture
def make_distribution():
    """:func:`write_distribution`, for tests that build their own installed plugin."""
    return write_distribution


@pytest.fixture
def toy_meta() -> tuple[str, str, dict[str, str]]:
    """:func:`toy_metadata` of the example plugin."""
    return toy_metadata()


@pytest.fixture
def toy_site(tmp_path: Path) -> Path:
    """A folder holding the example plugin as an installed distribution (not on sys.path)."""
    name, version, eps = toy_metadata()
    return write_distribution(tmp_path / "site", name, version, eps, TOY_PROJECT / "src" / TOY_PACKAGE)


@pytest.fixture
def fresh_plugins() -> Iterator[None]:
    """Reload plugins from entry points before the test and forget them after, so that
    what a test registers or blocks does not leak into other tests."""
    reset_plugins()
    yield
    reset_plugins()
    _forget_modules(TOY_PACKAGE)


@pytest.fixture
def toy_registered(fresh_plugins: None, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The example plugin registered in this process (as a notebook would); returns its
    settings file ``toy.toml``."""
    monkeypatch.syspath_prepend(str(TOY_PROJECT / "src"))
    from lvlmva_toy import plugin

    name, version, _ = toy_metadata()
    register_module(plugin, "toy", distribution=name, version=version)
    return TOY_PROJECT / "toy.toml"


@pytest.fixture
def study_toy_plugins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torch_global_state: None
) -> Iterator[Callable[[str, str], None]]:
    """``study_toy_plugins(module, source)``: the toy pipeline's plugins (pipeline_toys) and
    ``source`` written as the module ``module`` in ``tmp_path/plugins``, named in LVLMVA_PLUGINS
    and importable here and in the processes a study starts (PYTHONPATH); the plugins are
    reloaded, and after the test reloaded again and the module forgotten."""
    modules: list[str] = []

    def install(module: str, source: str) -> None:
        plugins = tmp_path / "plugins"
        plugins.mkdir()
        (plugins / f"{module}.py").write_text(textwrap.dedent(source))
        paths = [str(plugins), str(Path(__file__).parent)]
        monkeypatch.syspath_prepend(str(plugins))
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])]))
        monkeypatch.setenv("LVLMVA_PLUGINS", f"pipeline_toys,{module}")
        reset_plugins()
        modules.append(module)

    yield install
    reset_plugins()
    for module in modules:
        sys.modules.pop(module, None)
