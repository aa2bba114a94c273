"""pyproject.toml lists the packages by hand (package-dir maps three folders onto one import
package), so these tests keep that list, the package data and the installed metadata in step
with the source tree."""

from __future__ import annotations

import fnmatch
import importlib.metadata
import importlib.util
import sysconfig
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
PACKAGE_DIR: dict[str, str] = SETUPTOOLS["package-dir"]


def test_package_dir_maps_the_three_source_folders():
    assert PACKAGE_DIR == {
        "lvlmva": "core",
        "lvlmva.plugins": "plugins",
        "lvlmva.datasets": "datasets",
    }


def package_folder(name: str, package_dir: dict[str, str] = PACKAGE_DIR) -> Path:
    """Where package ``name`` lives: the folder of its longest mapped prefix plus the rest."""
    root = max((p for p in package_dir if name == p or name.startswith(p + ".")), key=len)
    rest = name[len(root) :].lstrip(".")
    return REPO / package_dir[root] / Path(*rest.split(".")) if rest else REPO / package_dir[root]


def source_packages(package_dir: dict[str, str] = PACKAGE_DIR) -> dict[str, Path]:
    """Every folder with an ``__init__.py`` under the mapped folders, by import name."""
    found: dict[str, Path] = {}
    for root, folder in package_dir.items():
        for init in sorted((REPO / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(REPO / folder)
            name = ".".join((root, *rel.parts))
            # a folder inside another mapping (none today) belongs to the longest one
            if package_folder(name, package_dir) == init.parent:
                found[name] = init.parent
    return found


def missing_packages(listed: list[str], package_dir: dict[str, str] = PACKAGE_DIR) -> list[str]:
    """Source packages that ``listed`` lacks, as ``"name (folder)"``."""
    return [
        f"{name} ({path.relative_to(REPO)})"
        for name, path in sorted(source_packages(package_dir).items())
        if name not in listed
    ]


def test_every_source_package_is_listed():
    missing = missing_packages(SETUPTOOLS["packages"])
    assert not missing, "add to [tool.setuptools] packages in pyproject.toml: " + ", ".join(missing)


def test_the_check_names_a_missing_package():
    """The check above, on the real tree, without one entry: it must name that package."""
    listed = [p for p in SETUPTOOLS["packages"] if p != "lvlmva.plugins.aligners"]
    assert missing_packages(listed) == ["lvlmva.plugins.aligners (plugins/aligners)"]


def test_every_listed_package_exists():
    listed = SETUPTOOLS["packages"]
    assert len(set(listed)) == len(listed), "a package is listed twice"
    absent = [p for p in listed if not (package_folder(p) / "__init__.py").is_file()]
    assert not absent, f"listed in pyproject.toml but no __init__.py: {absent}"


def _packaged(path: Path) -> bool:
    """Whether setuptools' package-data globs (relative to the owning package) take ``path``."""
    data = SETUPTOOLS["package-data"]
    owners = [n for n in SETUPTOOLS["packages"] if path.is_relative_to(package_folder(n))]
    assert owners, f"{path} lies in no listed package"
    owner = max(owners, key=len)
    folder = package_folder(owner)
    patterns = data.get("*", []) + data.get(owner, [])
    parts = path.relative_to(folder).parts
    return any(_glob_match(parts, pattern) for pattern in patterns)


def _glob_match(parts: tuple[str, ...], pattern: str) -> bool:
    """Glob semantics (``*`` stays within one folder), for paths that need not exist."""
    assert "**" not in pattern, "extend this check for recursive globs"
    pieces = pattern.split("/")
    return len(pieces) == len(parts) and all(map(fnmatch.fnmatchcase, parts, pieces))


@pytest.mark.parametrize("pattern", ["core/templates/*.toml", "datasets/specs/*.toml"])
def test_package_data_covers_templates_and_dataset_specs(pattern):
    files = sorted(REPO.glob(pattern))
    assert files, f"no {pattern}"
    left_out = [str(f.relative_to(REPO)) for f in files if not _packaged(f)]
    assert not left_out, f"not in [tool.setuptools.package-data]: {left_out}"


def test_package_data_check_sees_a_file_outside_the_globs():
    """A spec one folder deeper than ``specs/*.toml`` is not packaged: the check must say so."""
    assert not _packaged(REPO / "datasets" / "specs" / "deeper" / "x.toml")
    assert _packaged(REPO / "datasets" / "specs" / "x.toml")


def test_installed_metadata_has_the_entry_point_and_console_script():
    # `python -m pytest` puts the repository on sys.path, where a stale lvlmva.egg-info from a
    # build may sit: read the metadata pip installed instead.
    installed = [
        d
        for d in importlib.metadata.distributions(name=PYPROJECT["project"]["name"])
        if Path(d.locate_file("")).resolve() != REPO
    ]
    assert installed, "lvlmva is not installed (pip install -e .)"
    eps = installed[0].entry_points
    plugins = [ep for ep in eps if ep.group == "lvlmva"]
    assert (
        [(ep.name, ep.value) for ep in plugins]
        == list(PYPROJECT["project"]["entry-points"]["lvlmva"].items())
        == [("lvlmva", "lvlmva.plugins")]
    )
    scripts = [ep for ep in eps if ep.group == "console_scripts"]
    assert (
        [(ep.name, ep.value) for ep in scripts]
        == list(PYPROJECT["project"]["scripts"].items())
        == [("lvlmva", "lvlmva.cli:main")]
    )
    # Their targets resolve (found, not imported) and the script was installed next to python.
    assert importlib.util.find_spec(plugins[0].module) is not None
    assert importlib.util.find_spec(scripts[0].module) is not None
    assert list(Path(sysconfig.get_path("scripts")).glob("lvlmva*")), "no lvlmva script"
