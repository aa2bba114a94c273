"""review/overrides.json: the format written and read back, every error naming the file, and
how a person's overrides change the judge's verdicts (what the ``overrides`` stage applies)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lvlmva.overrides import (
    Override,
    OverridesError,
    apply_overrides,
    read_overrides,
    write_overrides,
)
from lvlmva.records import Verdicts

COLORS = ("red", "blue", "green")


def _override(sample: int, colour: str, verdict: str, **kw) -> Override:
    return Override(sample, colour, verdict, kw.pop("when", "2026-12-02T04:10:00+00:00"), **kw)


def _doc(*items: dict, **top) -> dict:
    return {"format": "lvlmva-overrides", "version": 1, "overrides": list(items), **top}


def _entry(**kw) -> dict:
    return {"sample": 4, "colour": "red", "verdict": "no", "when": "2026-12-02T04:10:00+00:00", **kw}


def test_round_trip_sorted_with_reviewer_and_comment(tmp_path: Path):
    path = tmp_path / "review" / "overrides.json"  # the folder is made on the first write
    written = [
        _override(9, "blue", "yes", reviewer="ana", comment="on the stroke"),
        _override(2, "red", "no"),
        _override(2, "blue", "no", reviewer="bo"),
    ]
    write_overrides(path, written)
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["format"] == "lvlmva-overrides" and doc["version"] == 1
    assert [(o["sample"], o["colour"]) for o in doc["overrides"]] == [(2, "blue"), (2, "red"), (9, "blue")]
    back = read_overrides(path)
    assert sorted(back, key=lambda o: (o.sample, o.colour)) == sorted(written, key=lambda o: (o.sample, o.colour))
    assert back[2].reviewer == "ana" and back[2].comment == "on the stroke" and back[2].relevant
    assert not back[1].relevant
    assert not list(path.parent.glob(".*.tmp"))  # the atomic write left no temporary file


def test_a_missing_file_is_no_overrides(tmp_path: Path):
    assert read_overrides(tmp_path / "review" / "overrides.json") == []


def test_optional_keys_may_be_left_out(tmp_path: Path):
    path = tmp_path / "overrides.json"
    path.write_text(json.dumps(_doc(_entry())), encoding="utf-8")
    (o,) = read_overrides(path)
    assert (o.sample, o.colour, o.verdict, o.reviewer, o.comment) == (4, "red", "no", "", "")


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("{not json", "is not JSON"),
        (json.dumps([]), "is not an lvlmva overrides file"),
        (json.dumps({**_doc(), "format": "something-else"}), "is not an lvlmva overrides file"),
        (json.dumps({**_doc(), "version": 2}), "version 2 is not supported"),
        (json.dumps({**_doc(), "overrides": {}}), '"overrides" must be a list'),
        (json.dumps(_doc("red")), "overrides[0] is str, not an object"),
        (json.dumps(_doc(_entry(), _entry(colour="blue", why="x"))), "overrides[1] has unknown keys ['why']"),
        (json.dumps(_doc({"sample": 4, "colour": "red", "verdict": "no"})), "lacks 'when'"),
        (json.dumps(_doc(_entry(verdict="maybe"))), "verdict must be \"yes\" or \"no\", got 'maybe'"),
        (json.dumps(_doc(_entry(verdict=True))), "verdict must be"),
        (json.dumps(_doc(_entry(sample=-1))), "sample must be a training-split index"),
        (json.dumps(_doc(_entry(sample=True))), "sample must be a training-split index"),
        (json.dumps(_doc(_entry(sample="4"))), "sample must be a training-split index"),
        (json.dumps(_doc(_entry(colour=""))), "colour is empty"),
        (json.dumps(_doc(_entry(comment=3))), "comment must be a string"),
        (
            json.dumps(_doc(_entry(), _entry(colour="blue"), _entry(verdict="yes"))),
            "overrides[0] and overrides[2] both decide sample 4, colour red",
        ),
    ],
)
def test_every_unusable_file_is_refused_naming_the_file(tmp_path: Path, content: str, says: str):
    path = tmp_path / "review" / "overrides.json"
    path.parent.mkdir()
    path.write_text(content, encoding="utf-8")
    with pytest.raises(OverridesError) as info:
        read_overrides(path)
    assert str(path) in str(info.value)
    assert says in str(info.value)


def test_undecodable_bytes_name_the_file(tmp_path: Path):
    path = tmp_path / "overrides.json"
    path.write_bytes(b"\xff\xfe{")
    with pytest.raises(OverridesError, match="cannot read .*overrides.json"):
        read_overrides(path)


# -- applying ---------------------------------------------------------------------------------


def _judged() -> list[Verdicts]:
    return [
        Verdicts(1, COLORS, (True, False, True), uncertainty=0.25, votes=((True, False, True),) * 3),
        Verdicts(2, COLORS, (True, True, False)),
        Verdicts(3, COLORS, None, failure="the 2 answers with verdicts are tied on red (1 yes, 1 no)"),
    ]


def test_overrides_flip_verdicts_and_record_who_decided():
    judged = _judged()
    out = apply_overrides(judged, [_override(1, "blue", "yes"), _override(1, "green", "no")])
    assert [v.sample_id for v in out] == [1, 2, 3]
    first = out[0]
    assert first.relevant == (True, True, False)
    assert first.sources == ("judge", "person", "person")
    assert first.judge_relevant == (True, False, True)
    assert first.overridden == ("blue", "green")
    assert first.uncertainty == 0.25 and first.votes == judged[0].votes  # the judge's record is kept
    assert out[1] is judged[1] and out[2] is judged[2]  # unreviewed samples: as the judge left them
    # what the stage stores reads back with its sources
    assert Verdicts.from_state(first.to_state()) == first


def test_an_override_equal_to_the_judge_still_counts_as_the_persons():
    (v, *_) = apply_overrides(_judged(), [_override(1, "red", "yes")])
    assert v.relevant == (True, False, True) and v.sources == ("person", "judge", "judge")
    assert v.judge_relevant == (True, False, True)


def test_a_failed_sample_fully_decided_by_a_person_becomes_usable():
    overrides = [_override(3, "red", "no"), _override(3, "blue", "yes"), _override(3, "green", "yes")]
    v = apply_overrides(_judged(), overrides)[2]
    assert v.ok and v.failure is None and not v.retryable
    assert v.relevant == (False, True, True)
    assert v.sources == ("person",) * 3 and v.judge_relevant is None


def test_a_failed_sample_partly_decided_stays_failed_and_says_so():
    v = apply_overrides(_judged(), [_override(3, "red", "no"), _override(3, "green", "yes")])[2]
    assert not v.ok and v.relevant is None
    assert v.failure.startswith("the 2 answers with verdicts are tied on red")
    assert "a person decided 2 of its 3 colours" in v.failure


def test_stale_overrides_are_refused_naming_samples_colours_and_the_file(tmp_path: Path):
    path = tmp_path / "review" / "overrides.json"
    overrides = [_override(1, "red", "no"), _override(77, "pink", "no"), _override(2, "olive", "yes")]
    with pytest.raises(OverridesError) as info:
        apply_overrides(_judged(), overrides, path)
    message = str(info.value)
    assert str(path) in message
    assert "sample 77 (pink): not an alignment sample of this run" in message
    assert "sample 2: colour(s) olive not among its clusters (red, blue, green)" in message
    assert "sample 1" not in message
