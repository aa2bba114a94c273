"""Every hook of the plugin surface has a test and an entry in the plugin author guide: a new
hook without either fails here."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from lvlmva import hookspecs

TESTS = Path(__file__).resolve().parents[1]
GUIDE = TESTS.parent / "docs" / "plugins.md"

HOOKS = sorted(
    name
    for name, obj in vars(hookspecs).items()
    if callable(obj) and hasattr(obj, f"{hookspecs.PROJECT}_spec")
)


def test_the_hooks_are_found():
    assert HOOKS == ["lvlmva_register", "lvlmva_run_finished", "lvlmva_stage_finished", "lvlmva_stage_started"]


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_test(hook):
    users = [
        path.relative_to(TESTS).as_posix()
        for path in TESTS.rglob("test_*.py")
        if path.resolve() != Path(__file__).resolve() and re.search(rf"\b{hook}\b", path.read_text())
    ]
    assert users, f"no test under tests/ uses the hook {hook}"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_with_its_arguments(hook):
    guide = GUIDE.read_text(encoding="utf-8")
    arguments = list(inspect.signature(getattr(hookspecs, hook)).parameters)
    signature = f"{hook}({', '.join(arguments)})"
    assert signature in guide, f"docs/plugins.md does not document {signature}"
