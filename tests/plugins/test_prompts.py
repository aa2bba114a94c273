"""Prompt templates: built-ins load and fill, user files are checked with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lvlmva.plugins.lvlm.prompts import (
    PLACEHOLDERS,
    TemplateError,
    load_template,
    render_critic_prompt,
    render_judge_prompt,
)
from lvlmva.plugins.lvlm.verdict_schema import parse_judge_answer
from lvlmva.records import Critique, CritiqueRequest, RenderedSample
from lvlmva.templates import builtin_families

FAMILIES = ["decoy-mnist", "knee", "skin"]


def _request(
    colors=("red", "blue", "green"), label="7", description="A bar and a slant."
) -> CritiqueRequest:
    rendered = RenderedSample(5, b"o", b"c", b"v", tuple(colors))
    return CritiqueRequest(
        5, label, description, "decoy-mnist", rendered, torch.zeros(2, 2, dtype=torch.long)
    )


def test_every_family_ships_both_roles():
    assert set(FAMILIES) <= set(builtin_families())


@pytest.mark.parametrize("family", FAMILIES)
def test_critic_prompt_is_filled_and_asks_for_verdict_lines(family):
    template = load_template(family, "critic")
    assert template.version and template.role == "critic" and template.family == family
    text = render_critic_prompt(template, _request(label="cls-X", description="DESC-Y."))
    assert not any(p in text for p in PLACEHOLDERS)
    assert "cls-X" in text and "DESC-Y." in text
    assert "red, blue, green" in text and " 3 " in text
    # The rules judge parses these lines from free answers.
    assert '"Verdict: yes"' in text and '"Verdict: no"' in text


@pytest.mark.parametrize("family", FAMILIES)
def test_judge_prompt_carries_format_examples_and_critique(family):
    template = load_template(family, "judge")
    critique = Critique(
        5, ("red", "blue"), "Red: on the digit.\nBlue: a {corner} <label>", family=family
    )
    instructions, user = render_judge_prompt(template, critique)
    assert '"output"' in instructions and '"verdict"' in instructions
    assert "red, blue" in instructions and "<cluster_colors>" not in instructions
    # The critique is inserted verbatim, placeholder-looking text inside it included.
    assert "Blue: a {corner} <label>" in user


@pytest.mark.parametrize("family", FAMILIES)
def test_judge_few_shot_examples_are_valid_answers(family):
    """Every example JSON in a judge template must itself pass validation."""
    text = load_template(family, "judge").text
    examples = [line for line in text.splitlines() if line.startswith('{"output"')]
    assert examples
    for line in examples:
        import json

        colors = [item["color"] for item in json.loads(line)["output"]]
        parsed = parse_judge_answer(line, colors)
        assert len(parsed.relevant) == len(colors) and parsed.ignored == ()


def test_class_descriptions_come_from_the_data_sets_specification(tmp_path):
    from lvlmva.datasets.class_specs import load_class_spec

    assert load_class_spec("knee")[0] == ("no osteoarthritis", "osteoarthritis")
    assert load_class_spec("skin")[0] == ("benign", "malignant")
    assert all("osteophytes" not in d for d in load_class_spec("skin")[1])
    # a template that still carries its own descriptions is refused with the reason
    file = tmp_path / "old.critic.toml"
    file.write_text(
        'version = "x/1"\ntext = "<label> <class_description> <num_clusters> <cluster_colors>"\n'
        '[class_descriptions]\n"a" = "b"\n',
        encoding="utf-8",
    )
    with pytest.raises(TemplateError, match="come with the data set"):
        load_template("custom", "critic", file)


def test_user_template_file(tmp_path: Path):
    path = tmp_path / "mine.toml"
    path.write_text(
        'version = "mine/7"\n'
        'text = "Class <label> (<class_description>): <num_clusters> clusters <cluster_colors>."\n',
        encoding="utf-8",
    )
    template = load_template("anything", "critic", path)
    assert template.version == "mine/7" and template.source == str(path)
    assert (
        render_critic_prompt(template, _request())
        == "Class 7 (A bar and a slant.): 3 clusters red, blue, green."
    )


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('text = "<label> <class_description> <num_clusters> <cluster_colors>"', "'version'"),
        ('version = "1"', "'text'"),
        ('version = "1"\ntext = "<label> <num_clusters> <cluster_colors>"', "<class_description>"),
        ('version = "1"\ntext = "x"\nextra = 1', "unknown keys"),
        ("version = ", "not valid TOML"),
    ],
)
def test_bad_user_template_names_file_and_problem(tmp_path: Path, content, needle):
    path = tmp_path / "bad.toml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TemplateError) as info:
        load_template("decoy-mnist", "critic", path)
    assert str(path) in str(info.value) and needle in str(info.value)


def test_judge_template_needs_critique_placeholder(tmp_path: Path):
    path = tmp_path / "judge.toml"
    path.write_text('version = "1"\ntext = "<num_clusters> <cluster_colors>"\nuser = "no slot"\n')
    with pytest.raises(TemplateError, match="<critique>"):
        load_template("x", "judge", path)


def test_missing_family_and_file_are_clear(tmp_path: Path):
    with pytest.raises(TemplateError, match="no built-in critic template for family 'nope'"):
        load_template("nope", "critic")
    with pytest.raises(TemplateError, match="no such judge template file"):
        load_template("x", "judge", tmp_path / "absent.toml")


def test_failed_critique_cannot_be_judged():
    critique = Critique(1, ("red",), None, failure="timeout")
    with pytest.raises(ValueError, match="timeout"):
        render_judge_prompt(load_template("decoy-mnist", "judge"), critique)
