"""Judge answer validation: accepted forms, every failure with a message fit to feed back."""

from __future__ import annotations

import json

import pytest

from lvlmva.plugins.lvlm.verdict_schema import (
    JudgeAnswerError,
    ParsedVerdicts,
    judge_json_schema,
    parse_judge_answer,
)

COLORS = ("red", "blue", "green")


def _answer(items) -> str:
    return json.dumps({"output": [{"color": c, "verdict": v} for c, v in items]})


def test_valid_answer_in_colour_order():
    text = _answer([("green", "yes"), ("red", "no"), ("blue", "yes")])
    assert parse_judge_answer(text, COLORS) == ParsedVerdicts((False, True, True), ())


@pytest.mark.parametrize(
    "wrap",
    [
        "```json\n{}\n```",
        "Here is the JSON you asked for:\n```\n{}\n```\nHope this helps.",
        "Sure. {} That is all.",
    ],
)
def test_fences_and_prose_around_one_object(wrap):
    text = wrap.replace("{}", _answer([("red", "yes"), ("blue", "no"), ("green", "no")]))
    assert parse_judge_answer(text, COLORS).relevant == (True, False, False)


def test_case_and_spaces_are_normalised_extra_keys_ignored():
    text = json.dumps(
        {
            "output": [
                {"color": " Red", "verdict": "YES", "reason": "on the digit"},
                {"color": "BLUE", "verdict": "No"},
                {"color": "green", "verdict": "no"},
            ]
        }
    )
    assert parse_judge_answer(text, COLORS).relevant == (True, False, False)


def test_extra_colours_are_set_aside_and_the_listed_ones_used():
    text = _answer(
        [("pink", "no"), ("red", "yes"), ("blue", "no"), ("Brown", "yes"), ("green", "yes"),
         ("pink", "yes")]
    )  # fmt: skip
    assert parse_judge_answer(text, COLORS) == ParsedVerdicts(
        (True, False, True), ("pink", "brown")
    )


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "empty"),
        ("Red is relevant, blue is not.", "no JSON object"),
        ('{"output": [{"color": "red", "verdict": "yes"}', "not valid JSON"),
        ("[1, 2]", "got a list"),
        ('{"verdicts": []}', 'no key "output"'),
        (_answer([("red", "yes"), ("blue", "no")]), 'missing colour(s) "green"'),
        (
            _answer([("red", "yes"), ("blue", "no"), ("green", "no"), ("red", "no")]),
            'more than once "red"',
        ),
        (
            _answer([("red", "yes"), ("blue", "no"), ("pink", "no")]),
            'missing colour(s) "green"',
        ),
        (
            _answer([("red", "maybe"), ("blue", "no"), ("green", "no")]),
            'item 1 "verdict" must be "yes" or "no"',
        ),
        (
            '{"output": [{"color": "red"}, {"color": "blue", "verdict": "no"}]}',
            'item 1 "verdict" is missing',
        ),
        ("```json\n{not json}\n```", "block is not valid JSON"),
    ],
)
def test_invalid_answers_raise_with_reason_and_format(text, needle):
    with pytest.raises(JudgeAnswerError) as info:
        parse_judge_answer(text, COLORS)
    message = str(info.value)
    assert needle in message
    # Every message restates the expected format so that it can be fed back to the model.
    assert "red, blue, green" in message and '"output"' in message
    assert isinstance(info.value, ValueError)


def test_json_schema_shape():
    schema = judge_json_schema(COLORS)
    items = schema["properties"]["output"]
    assert items["minItems"] == items["maxItems"] == 3
    assert items["items"]["properties"]["color"]["enum"] == list(COLORS)
    assert items["items"]["properties"]["verdict"]["enum"] == ["yes", "no"]
    assert schema["required"] == ["output"]
    json.dumps(schema)  # serialisable as sent to a server


def test_schema_accepts_what_the_parser_accepts():
    """A minimal structural check of the schema against a valid and an invalid answer."""
    schema = judge_json_schema(COLORS)
    good = json.loads(_answer([("red", "yes"), ("blue", "no"), ("green", "no")]))

    def conforms(value) -> bool:
        out = value.get("output")
        spec = schema["properties"]["output"]
        if not isinstance(out, list) or not spec["minItems"] <= len(out) <= spec["maxItems"]:
            return False
        props = spec["items"]["properties"]
        return all(
            set(item) == {"color", "verdict"}
            and item["color"] in props["color"]["enum"]
            and item["verdict"] in props["verdict"]["enum"]
            for item in out
        )

    assert conforms(good)
    assert not conforms({"output": good["output"][:2]})
