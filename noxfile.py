"""Developer sessions. All run in the current environment (python=False) so that nox never
reinstalls torch; install the project first with `pip install -e ".[dev]"`."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.default_venv_backend = "none"


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """The default test suite (what CI runs)."""
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python=False)
def slow(session: nox.Session) -> None:
    """Tests marked slow (minutes)."""
    session.run("python", "-m", "pytest", "-m", "slow", *session.posargs)


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    """ruff on the package, tests and benchmarks."""
    session.run("ruff", "check", "core", "plugins", "datasets", "tests", "benchmarks", "noxfile.py")


@nox.session(python=False)
def docs(session: nox.Session) -> None:
    """Regenerate docs/settings.md from the plugins' Options models."""
    with open("docs/settings.md", "w", encoding="utf-8") as fh:
        session.run("python", "-m", "lvlmva.reference", stdout=fh)


@nox.session(python=False)
def benchmarks(session: nox.Session) -> None:
    """Every performance comparison in benchmarks/ (each prints its ratio and target)."""
    import glob

    for script in sorted(glob.glob("benchmarks/bench_*.py")):
        session.run("python", script)


@nox.session(python=False)
def compare(session: nox.Session) -> None:
    """A study: seeds x methods with table.md, statistics and plots: `nox -s compare -- SETTINGS...`."""
    session.run("lvlmva", "study", *(session.posargs or ["examples/decoy_mnist_study.toml"]))


@nox.session(python=False)
def sweep(session: nox.Session) -> None:
    """Lambda sweep of RRR on DecoyMNIST: `nox -s sweep -- [SETTINGS] [--lams L ...] [--out DIR]`
    (`lvlmva sweep --help`; SETTINGS defaults to examples/decoy_mnist.toml here)."""
    args = session.posargs or []
    session.run("python", "-m", "lvlmva.sweep", *args)
