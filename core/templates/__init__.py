"""Prompt templates shipped with lvlmva: one TOML file per dataset family and role.

Files are named ``<family>.<role>.toml`` (``decoy-mnist.critic.toml``). Each holds ``version``
and ``text`` (plus ``user`` for judges); the class descriptions come from the data set's
specification (``lvlmva/datasets/specs/<family>.toml``). The loader and renderer live in
:mod:`lvlmva.plugins.lvlm.prompts`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["ROLES", "builtin_families", "builtin_template_path"]

#: the roles a template can serve
ROLES = ("critic", "judge")


def _folder() -> Path:
    return Path(str(resources.files(__name__)))


def builtin_families() -> list[str]:
    """Families that ship a template for every role."""
    found: dict[str, set[str]] = {}
    for file in _folder().glob("*.toml"):
        family, _, role = file.stem.rpartition(".")
        found.setdefault(family, set()).add(role)
    return sorted(f for f, roles in found.items() if set(ROLES) <= roles)


def builtin_template_path(family: str, role: str) -> Path:
    """Path of the built-in template for ``family`` and ``role``; a clear error when none ships."""
    if role not in ROLES:
        raise ValueError(f"unknown template role {role!r}; roles are: {', '.join(ROLES)}")
    path = _folder() / f"{family}.{role}.toml"
    if not path.is_file():
        raise FileNotFoundError(
            f"no built-in {role} template for family {family!r} (looked for {path.name}); "
            f"built-in families: {', '.join(builtin_families()) or '(none)'}; "
            f'or set the plugin option template = "path/to/your.toml"'
        )
    return path
