"""Tests of the rules judge: oracle round trip, LVLM-style answers, and every failure path."""

from __future__ import annotations

import json

import pydantic
import pytest
import torch

from lvlmva.plugins.critics.oracle import OracleCritic
from lvlmva.plugins.judges.rules import RulesJudge
from lvlmva.protocols import Judge, check_capabilities
from lvlmva.records import Critique, CritiqueRequest, RenderedSample

COLORS = ("red", "blue", "green", "yellow", "grey")
WANT = (False, True, True, False, True)


def _judge(text: str | None, colors=COLORS, failure: str | None = None, ctx=None):
    critique = Critique(sample_id=3, colors=colors, text=text, failure=failure)
    [v] = RulesJudge(RulesJudge.Options()).judge([critique], ctx)
    assert v.sample_id == 3 and v.colors == colors
    return v


def test_rules_judge_fills_the_judge_role():
    assert check_capabilities("judge", RulesJudge) == []
    assert isinstance(RulesJudge(RulesJudge.Options()), Judge)
    for field in RulesJudge.Options.model_fields.values():
        assert field.description


def test_round_trip_with_the_oracle(ctx, rng):
    colors = ("red", "blue", "green", "yellow", "pink", "brown", "grey")
    requests = []
    for i in range(8):
        cmap = torch.from_numpy(rng.integers(0, len(colors), size=(14, 14)))
        mask = torch.zeros(14, 14, dtype=torch.bool)
        hit = rng.choice(len(colors), size=2, replace=False)  # two clusters mostly on the mask
        for c in hit:
            mask |= cmap == int(c)
        mask &= torch.from_numpy(rng.random((14, 14)) < 0.8)
        requests.append(
            CritiqueRequest(
                i,
                "7",
                "a seven",
                "decoy-mnist",
                RenderedSample(i, b"", b"", b"", colors),
                cmap,
                mask,
            )
        )
    critic = OracleCritic(OracleCritic.Options(min_overlap=0.3))
    critiques = critic.critique(requests, ctx)
    verdicts = RulesJudge(RulesJudge.Options()).judge(critiques, ctx)
    for req, v in zip(requests, verdicts, strict=True):
        share = [
            float((req.true_mask & (req.cluster_map == j)).sum())
            / max(int((req.cluster_map == j).sum()), 1)
            for j in range(len(colors))
        ]
        assert v.ok and v.sample_id == req.sample_id
        assert list(v.relevant) == [s < 0.3 for s in share]
        assert not all(v.relevant)


LVLM_ANSWERS = {
    "bold headings": """Here is my analysis of the clusters.

**Red**: This cluster covers the small square in the top-left corner, which is not part of
the digit. It is not relevant.

**Blue**: The blue cluster covers the upper stroke of the seven, unlike the red one. It is relevant.

**Green**: The lower stroke. It supports the class.

**Yellow**: Background to the right of the digit. It is irrelevant.

**Grey**: The diagonal of the seven. Relevant.
""",
    "markdown headers": """### Red Cluster
The red cluster lies on the bright square.
**Verdict:** No

### Blue Cluster
Covers the top bar of the digit.
**Verdict:** Yes

### Green Cluster
The green cluster covers the diagonal stroke, which is typical of a seven.
Conclusion: Relevant

### Yellow Cluster
Mostly empty background near the right edge.
Conclusion: Not relevant

### Grey Cluster
The grey cluster isn't related to the decoy; it covers the digit's end.
**Final answer:** yes
""",
    "numbered paragraphs": """1. The red cluster sits on the decoy square. It is spurious.
2. The blue cluster covers the digit. Relevant: yes
3. The green cluster: not spurious.
4. The yellow cluster covers nothing of interest; spurious: yes.
5. The gray cluster is not an artifact; it is the stroke and clearly relevant.
""",
    "bullets with dashes": """- **Red cluster** \u2013 covers the marker. Answer: No.
- **Blue cluster** \u2013 the joint space; this doesn\u2019t look spurious.
- Cluster 3 (green): bone edge, relevant.
- Cluster 4 (yellow): background, irrelevant
- Cluster 5 (grey): Verdict = yes
""",
    "one line": "Red: no, Blue: yes, Green: yes, Yellow: no, Grey: yes",
    "discussion then summary": """The image shows a seven with a square in the corner.

Red covers the square in the corner, which the description does not mention.
The blue cluster lies on the horizontal bar.
The green cluster lies on the diagonal.
Yellow is background on the right.
The grey cluster is the lower end of the stroke.

Summary: red – spurious, blue – relevant, green – relevant, yellow – not relevant,
grey – relevant.
""",
    "judge json": '{"output": [{"color": "red", "verdict": "no"}, {"color": "blue", "verdict": "yes"}, '
    '{"color": "green", "verdict": "yes"}, {"color": "yellow", "verdict": "no"}, '
    '{"color": "gray", "verdict": "yes"}]}',
}


@pytest.mark.parametrize("style", list(LVLM_ANSWERS))
def test_lvlm_style_answers(style):
    v = _judge(LVLM_ANSWERS[style])
    assert v.failure is None, v.failure
    assert v.relevant == WANT


def test_the_verdict_marker_wins_over_the_discussion():
    text = (
        "Red: the decoy square is a spurious shortcut, but this cluster is the digit stroke.\n"
        "Verdict: yes\nBlue: yes\nGreen: yes\nYellow: yes\nGrey: yes"
    )
    assert _judge(text).relevant == (True,) * 5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Red: no\nBlue: yes\nGreen: yes\nYellow: no", "colour 'grey': not discussed"),
        (
            "Red: no\nBlue: yes\nGreen: yes\nYellow: no\nGrey: It is relevant but also spurious.",
            "colour 'grey': ambiguous verdict (yes and no in",
        ),
        (
            "Red: no\nBlue: yes\nGreen: yes\nYellow: no\nGrey: yes\nGrey: no",
            "colour 'grey': ambiguous verdict (both yes and no given)",
        ),
        (
            "Red: no\nBlue: yes\nGreen: yes\nYellow: no\nGrey: covers the digit's end.",
            "colour 'grey': no yes/no verdict found",
        ),
        (
            "Red: no\nBlue: yes\nGreen: yes\nYellow: no\nGrey: yes\nCyan: no",
            "unknown colour 'cyan' in the critique (this sample's colours: red, blue",
        ),
        (
            "Red: no\nBlue: yes\nGreen: yes\nYellow: no\nGrey: yes\n**Magenta cluster**: relevant",
            "unknown colour 'magenta'",
        ),
        ('{"answer": []}', 'JSON answer lacks an "output" list'),
        (
            '{"output": [{"color": "red", "verdict": "maybe"}]}',
            "colour 'red': verdict 'maybe' is not yes/no",
        ),
    ],
)
def test_failures_name_the_colour_and_the_problem(text, message):
    v = _judge(text)
    assert v.relevant is None and not v.ok
    assert v.failure.startswith("rules judge, sample 3: ")
    assert message in v.failure


def test_json_answer_sets_extra_colours_aside():
    items = [("pink", "no"), ("red", "no"), ("blue", "yes"), ("green", "yes"), ("yellow", "no")]
    items += [("Gray", "yes"), ("Pink", "no")]
    text = json.dumps({"output": [{"color": c, "verdict": v} for c, v in items]})
    v = _judge(text)
    assert v.relevant == WANT and v.ignored_colors == ("pink",)
    assert _judge(LVLM_ANSWERS["judge json"]).ignored_colors == ()


def test_a_failed_critique_passes_its_reason_on():
    v = _judge(None, failure="connection refused at http://127.0.0.1:9/v1")
    assert not v.ok and not v.retryable
    assert "critic failed: connection refused at http://127.0.0.1:9/v1" in v.failure


def test_custom_words():
    judge = RulesJudge(RulesJudge.Options(yes_words=["keep"], no_words=["drop"]))
    critique = Critique(sample_id=0, colors=("red", "blue"), text="Red: drop\nBlue: keep")
    assert judge.judge([critique], None)[0].relevant == (False, True)
    with pytest.raises(ValueError, match="both a yes and a no word"):
        RulesJudge(RulesJudge.Options(yes_words=["ok"], no_words=["ok"]))
    with pytest.raises(pydantic.ValidationError):
        RulesJudge.Options(yes_words=[])
