"""Every example settings file validates: its sections, plugins and options are what the
toolkit accepts (the data folders of the user-data examples need not exist for that)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lvlmva.cli import EXIT_OK, main

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
#: the effects study's cells, one settings file per variant (lvlmva study examples/decoy_mnist_effects/*.toml)
EFFECTS_STUDY = sorted((EXAMPLES_DIR / "decoy_mnist_effects").glob("*.toml"))
#: the critic-quality study's data sets (lvlmva study examples/critic_quality/*.toml)
CRITIC_QUALITY = sorted((EXAMPLES_DIR / "critic_quality").glob("*.toml"))
#: the baselines study's data sets (lvlmva study examples/baselines/*.toml)
BASELINES = sorted((EXAMPLES_DIR / "baselines").glob("*.toml"))
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.toml")) + EFFECTS_STUDY + CRITIC_QUALITY + BASELINES


def test_the_medical_examples_are_there():
    names = {p.name for p in EXAMPLES}
    for name in ("synthetic_skin.toml", "synthetic_knee.toml", "skin_openai.toml", "knee_openai.toml",
                 "knee_folder.toml", "isic_folder.toml", "dermamnist.toml", "skin_paper.toml", "knee_paper.toml"):  # fmt: skip
        assert name in names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.relative_to(EXAMPLES_DIR).as_posix())
def test_example_validates(path, monkeypatch, capsys):
    from lvlmva.registry import reset_plugins

    monkeypatch.setenv("OPENAI_API_KEY", "sk-placeholder-for-validation")
    if "LVLMVA_PLUGINS=lvlmva.testing.toy_plugins" in path.read_text():  # its header: run with the test helpers' plugins
        monkeypatch.setenv("LVLMVA_PLUGINS", "lvlmva.testing.toy_plugins")
    reset_plugins()
    try:
        code = main(["validate", str(path), "--no-data"])  # the user-data examples name folders of the user's
    finally:
        monkeypatch.delenv("LVLMVA_PLUGINS", raising=False)
        reset_plugins()
    assert code == EXIT_OK, capsys.readouterr().err


def test_the_effects_study_compares_what_it_says():
    """Every variant is the lowest-entropy DecoyMNIST pipeline over seeds 0..6 in one study; an
    absolute-effect file differs from its positive twin in the effect alone, and the attributor
    files from the paper's (deeplift_positive) in the attributor (and, for Grad-CAM, the model)."""
    from lvlmva.settings import load_settings

    settings = {p.stem: load_settings(p, environ={}).as_dict() for p in EFFECTS_STUDY}
    assert set(settings) >= {
        "deeplift_positive", "deeplift_absolute", "integrated_gradients_positive", "gradient_shap_positive",
        "grad_cam_positive", "deeplift_cnn_positive",
    }  # fmt: skip

    def without(d, *keys):
        d = {section: dict(values) for section, values in d.items()}
        for key in keys:
            section, _, name = key.partition(".")
            d[section].pop(name) if name else d.pop(section)
        return d

    for name, s in settings.items():
        assert s["run"]["name"] == name
        assert s["selection"]["strategy"] == "lowest-entropy"
        assert s["study"]["seeds"] == list(range(7)) and s["study"]["name"] == "decoy_mnist_effects"
        assert s["segmenter"]["effect"] == name.rpartition("_")[2]
        if s["segmenter"]["effect"] == "absolute":
            twin = settings[name.replace("_absolute", "_positive")]
            assert without(s, "run.name", "segmenter.effect") == without(twin, "run.name", "segmenter.effect")
    paper = settings["deeplift_positive"]
    for name in ("integrated_gradients_positive", "gradient_shap_positive"):
        assert without(settings[name], "run.name", "attributor") == without(paper, "run.name", "attributor")
    cnn = settings["deeplift_cnn_positive"]
    assert without(cnn, "run.name", "model") == without(paper, "run.name", "model")
    assert without(settings["grad_cam_positive"], "run.name", "attributor") == without(cnn, "run.name", "attributor")


def test_the_baselines_study_runs_every_mitigator_under_both_rules():
    """Each data set of the baselines study trains every registered mitigator twice, <name> by
    worst-group and <name>_wc by worst-class validation accuracy, and compares LVLM-VA with the
    methods that need no group labels."""
    from lvlmva.registry import get_registry
    from lvlmva.settings import load_settings

    assert len(BASELINES) == 3
    mitigators = set(get_registry().names("mitigator"))
    for path in BASELINES:
        d = load_settings(path, environ={}).as_dict()
        instances = d["mitigators"]
        assert {v["plugin"] for v in instances.values()} == mitigators, path.name
        for name, options in instances.items():
            rule = "worst-class" if name.endswith("_wc") else "worst-group"
            assert options["selection"] == rule, (path.name, name)
            assert name.removesuffix("_wc") == options["plugin"], (path.name, name)
        assert d["critic"]["plugin"] == "oracle"
        pairs = {tuple(p) for p in d["study"]["comparisons"]}
        assert pairs == {("aligned", f"{m}_wc") for m in ("erm", "jtt", "suby", "rwy", "lff", "afr")}
