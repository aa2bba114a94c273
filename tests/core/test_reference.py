"""docs/settings.md is generated from the Options models and must match them."""

from __future__ import annotations

from pathlib import Path

from lvlmva.reference import options_table, render_settings_reference
from lvlmva.settings import CORE_SECTIONS, TrainOptions

DOC = Path(__file__).resolve().parents[2] / "docs" / "settings.md"


def test_settings_reference_is_up_to_date() -> None:
    assert DOC.read_text(encoding="utf-8") == render_settings_reference(), (
        "docs/settings.md is stale: regenerate it with `nox -s docs` "
        "(python -m lvlmva.reference > docs/settings.md)"
    )


def test_reference_lists_every_core_key_and_builtin_plugin() -> None:
    text = render_settings_reference()
    for section, model in CORE_SECTIONS.items():
        assert f"### `[{section}]`" in text
        for key in model.model_fields:
            assert f"| `{key}` |" in text
    for name in ("decoy-mnist", "mlp", "deeplift-shap", "ppeps-wgm", "oracle", "rules", "openai", "transformers", "rrr", "standard"):
        assert f'`plugin = "{name}"`' in text


def test_options_table_shows_defaults_and_descriptions() -> None:
    table = options_table(TrainOptions)
    assert "| `epochs` | `int` | `3` | Passes over the training split. |" in table

