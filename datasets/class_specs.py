"""Class specifications (the expert's words for each class) stored as package data.

Each family has ``specs/<family with "-" as "_">.toml`` next to this module, with a
``[[classes]]`` table per class (``name``, ``description``) in label order.
"""

from __future__ import annotations

import tomllib
from importlib import resources

__all__ = ["load_class_spec", "available_families"]


def _spec_dir():
    return resources.files("lvlmva.datasets").joinpath("specs")


def available_families() -> list[str]:
    """Families that ship a class specification."""
    return sorted(
        entry.name.removesuffix(".toml").replace("_", "-")
        for entry in _spec_dir().iterdir()
        if entry.name.endswith(".toml")
    )


def load_class_spec(family: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(names, descriptions)`` of the classes of ``family``, in label order."""
    entry = _spec_dir().joinpath(family.replace("-", "_") + ".toml")
    if not entry.is_file():
        raise ValueError(f"no class specification for family {family!r}; known: {available_families()}")
    spec = tomllib.loads(entry.read_text(encoding="utf-8"))
    if spec.get("family") != family:
        raise ValueError(f"{entry}: declares family {spec.get('family')!r}, expected {family!r}")
    classes = spec.get("classes")
    if not classes:
        raise ValueError(f"{entry}: no [[classes]] tables")
    for i, item in enumerate(classes):
        if set(item) != {"name", "description"} or not all(isinstance(v, str) and v for v in item.values()):
            raise ValueError(f"{entry}: class {i} must have exactly a non-empty name and description")
    return tuple(c["name"] for c in classes), tuple(c["description"] for c in classes)
