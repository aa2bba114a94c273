"""Every example settings file validates: its sections, plugins and options are what the
toolkit accepts (the data folders of the user-data examples need not exist for that)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lvlmva.cli import EXIT_OK, main

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.toml"))


def test_the_medical_examples_are_there():
    names = {p.name for p in EXAMPLES}
    for name in ("synthetic_skin.toml", "synthetic_knee.toml", "skin_openai.toml", "knee_openai.toml",
                 "knee_folder.toml", "isic_folder.toml", "dermamnist.toml", "skin_paper.toml", "knee_paper.toml"):  # fmt: skip
        assert name in names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(path, monkeypatch, capsys):
    from lvlmva.registry import reset_plugins

    monkeypatch.setenv("OPENAI_API_KEY", "sk-placeholder-for-validation")
    if path.name == "toy_mitigators.toml":  # its header: run with the test helpers' plugins
        monkeypatch.setenv("LVLMVA_PLUGINS", "lvlmva.testing.toy_plugins")
    reset_plugins()
    try:
        code = main(["validate", str(path)])
    finally:
        monkeypatch.delenv("LVLMVA_PLUGINS", raising=False)
        reset_plugins()
    assert code == EXIT_OK, capsys.readouterr().err
