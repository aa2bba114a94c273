"""The review flow as a user runs it, on small real DecoyMNIST digits through the command line
in-process: ``compose --until judge``, a person's overrides, ``compose`` again (stages up to the
judge reused, masks onward recomputed, the overrides counted and reported); in a run with two
segmenters x two critics, a review of one branch that realigns that branch alone; unusable
overrides files and ``--until`` names that stop with exit 2; the critic's uncertainty in results.json
(scripted critic; the OpenAI critic against the local scripted server); and an attributor that
refuses the model's architecture before anything trains."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch

from lvlmva.cli import EXIT_BAD_INPUT, EXIT_OK, main
from lvlmva.masks import masks_from_verdicts
from lvlmva.overrides import Override, read_overrides, write_overrides
from lvlmva.pipeline import open_run
from lvlmva.review.server import ReviewRun
from lvlmva.testing.openai_server import ScriptedOpenAIServer

pytest.importorskip("mlxtend")

pytestmark = pytest.mark.usefixtures("torch_global_state")

REPORT = """[report]
samples = 2
test_images = 2"""

BEFORE_REVIEW = ("train", "select", "attribute", "segment", "render", "critic", "judge")
FROM_REVIEW = ("overrides", "masks", "align", "reference", "evaluate.standard", "results", "report")


def _statuses(stage_lines: str) -> dict[str, str]:
    """Stage name -> computed | reused | skipped, from compose's stage lines."""
    return {m.group(1): m.group(2) for m in re.finditer(r"^\s+[-+=!x]\s+(\S+)\s+(computed|reused|skipped|failed)", stage_lines, re.M)}


def _records(run_dir: Path) -> dict[str, tuple[str, str]]:
    return {name: (r.fingerprint, r.content) for name, r in open_run(run_dir).records().items()}


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory, module_torch_state, compose_until_judge) -> tuple[Path, str, str]:
    """A run stopped after the judge (built once), with what compose printed."""
    return compose_until_judge(tmp_path_factory.mktemp("stopped"), report=REPORT)


@pytest.fixture
def run_dir(stopped, tmp_path: Path) -> Path:
    """A copy of the stopped run for one test (the cache stays the module's)."""
    return Path(shutil.copytree(stopped[0], tmp_path / "run"))


@pytest.fixture
def settings(stopped) -> Path:
    return stopped[0].parent / "settings.toml"


def test_until_judge_stops_after_the_verdicts(stopped):
    run_dir, out, err = stopped
    statuses = _statuses(err)
    assert all(statuses[s] == "computed" for s in BEFORE_REVIEW)
    assert all(statuses[s] == "skipped" for s in FROM_REVIEW)
    assert "skipped: after --until judge" in err
    records = open_run(run_dir).records()
    assert set(BEFORE_REVIEW) <= set(records) and not set(FROM_REVIEW) & set(records)
    assert not (run_dir / "results.json").exists() and not (run_dir / "report.md").exists()
    assert "stopped after judge (--until)" in out and f"lvlmva review {run_dir}" in out
    judged = open_run(run_dir).load("judge")
    assert len(judged) == 6 and all(len(v.votes) == 3 for v in judged)  # one per sample, three answers each
    assert len(open_run(run_dir).load("critic")) == 18


def test_two_overrides_recompute_masks_onward_and_are_reported(run_dir: Path, settings: Path, compose):
    review = ReviewRun(run_dir)
    labels = review.segmentation.labels
    toggled = {}
    for sid in review.ordered()[:2]:
        sample = review.samples[sid]
        # the sample's largest cluster, so that its mask must change
        sizes = torch.bincount(labels[sample.row].flatten(), minlength=len(sample.colors))
        j = int(sizes.argmax())
        review.toggle(sid, sample.colors[j], reviewer="ana", comment="checked")
        toggled[sid] = j
    assert len(read_overrides(run_dir / "review" / "overrides.json")) == 2
    before = _records(run_dir)

    code, out, err = compose(settings, run_dir)
    assert code == EXIT_OK, err
    statuses = _statuses(err)
    assert {s: statuses[s] for s in BEFORE_REVIEW} == dict.fromkeys(BEFORE_REVIEW, "reused")
    assert {s: statuses[s] for s in FROM_REVIEW} == dict.fromkeys(FROM_REVIEW, "computed")
    after = _records(run_dir)
    assert all(after[s] == before[s] for s in BEFORE_REVIEW)

    run = open_run(run_dir)
    results = run.results()
    assert results["review"]["overrides"] == 2
    assert results["review"]["changed"] == 2 and results["review"]["samples"] == 2
    assert sorted(results["review"]["samples_reviewed"]) == sorted(toggled)
    assert {"verdict_accuracy", "cluster_accuracy"} <= set(results["review"]["before"]) & set(results["review"]["after"])
    assert results["verdicts"]["critic"].endswith("+ person's review")
    assert "review: 2 verdicts decided by a person in 2 samples, 2 changed" in out

    # the masks: what the judge's verdicts give, but for the toggled clusters
    judged = run.load("judge")
    verdicts = run.load("overrides")
    assert [v.sample_id for v in verdicts] == [v.sample_id for v in judged]
    for v in verdicts:
        if v.sample_id in toggled:
            assert v.sources.count("person") == 1 and v.judge_relevant is not None
        else:
            assert v.sources == ()
    judge_masks, _ = masks_from_verdicts(labels, judged)
    masks = run.load("masks")["masks"]
    chosen = run.load("select").indices.tolist()
    for row, sid in enumerate(chosen):
        changed = masks[row] != judge_masks[row]
        if sid in toggled:
            assert torch.equal(changed, labels[row] == toggled[sid]), sid
        else:
            assert not changed.any(), sid

    report = (run_dir / "report.md").read_text(encoding="utf-8")
    assert "## Review" in report
    assert "A person decided 2 verdicts of 2 samples (review/overrides.json); 2 of them differ from the judge's" in report
    assert "## Critic uncertainty" in report and (run_dir / "figures" / "uncertainty.png").is_file()

    # the file is watched by its content: the same overrides written again reuse everything
    write_overrides(run_dir / "review" / "overrides.json", read_overrides(run_dir / "review" / "overrides.json"))
    code, _, err = compose(settings, run_dir, "--until", "masks")
    assert code == EXIT_OK and _statuses(err)["overrides"] == "reused" and _statuses(err)["masks"] == "reused"
    # one taken back: the overrides and the masks are computed again, the judge is not
    ReviewRun(run_dir).reset(sorted(toggled)[0])
    code, _, err = compose(settings, run_dir, "--until", "masks")
    statuses = _statuses(err)
    assert code == EXIT_OK and statuses["judge"] == "reused"
    assert statuses["overrides"] == "computed" and statuses["masks"] == "computed"
    assert sum(v.sources.count("person") for v in open_run(run_dir).load("overrides")) == 1


def test_a_malformed_overrides_file_stops_with_exit_2_and_is_left_as_it_is(run_dir: Path, settings: Path, compose):
    path = run_dir / "review" / "overrides.json"
    path.parent.mkdir()
    content = b'{"format": "lvlmva-overrides", "version": 1, "overrides": [oops]}\n'
    path.write_bytes(content)
    before = _records(run_dir)
    code, _, err = compose(settings, run_dir)
    assert code == EXIT_BAD_INPUT
    assert f"{path} is not JSON" in err
    assert path.read_bytes() == content
    after = _records(run_dir)
    assert after == before  # every stage up to the judge kept, nothing after it made
    assert not (run_dir / "overrides").exists() and not (run_dir / "results.json").exists()


def test_an_override_of_a_sample_the_run_does_not_have_stops_with_exit_2(run_dir: Path, settings: Path, compose):
    path = run_dir / "review" / "overrides.json"
    write_overrides(path, [Override(999999, "red", "no", "2026-12-02T04:10:00+00:00")])
    content = path.read_bytes()
    code, _, err = compose(settings, run_dir)
    assert code == EXIT_BAD_INPUT
    assert "sample 999999 (red): not an alignment sample of this run" in err and str(path) in err
    assert path.read_bytes() == content
    assert "judge" in open_run(run_dir).records() and "masks" not in open_run(run_dir).records()


def test_until_an_unknown_stage_is_refused(run_dir: Path, settings: Path, compose):
    before = _records(run_dir)
    code, _, err = compose(settings, run_dir, "--until", "nosuchstage")
    assert code == EXIT_BAD_INPUT
    assert "--until nosuchstage: this run has no stage 'nosuchstage'" in err and "judge" in err
    assert _records(run_dir) == before


# -- a run with several segmenters and critics ----------------------------------------------------

#: the branches of review_settings(..., branches=True)
BRANCH_KEYS = ("j3.scripted", "j3.oracle", "j4.scripted", "j4.oracle")


def test_a_review_of_one_branch_realigns_that_branch_alone(tmp_path: Path, review_settings, compose, torch_global_state):
    settings = review_settings(tmp_path, branches=True)
    run_dir = tmp_path / "run"
    code, _, err = compose(settings, run_dir, "--set", "report.enabled=false")  # every branch aligned once
    assert code == EXIT_OK, err

    # the command line names the branches when asked for one the run lacks
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["review", str(run_dir), "--branch", "j5.oracle", "--port", "0", "--no-browser"]) == EXIT_BAD_INPUT
    assert (
        "has no branch 'j5.oracle'; its branches: j3.scripted (J=3 x scripted critic), j3.oracle (J=3 x oracle critic), "
        "j4.scripted (J=4 x scripted critic), j4.oracle (J=4 x oracle critic)"
    ) in err.getvalue()

    # a person corrects one branch: the largest cluster of its first sample
    review = ReviewRun(run_dir, "j4.scripted")
    assert review.branch.label == "J=4 x scripted critic (j4.scripted)"
    sid = review.ordered()[0]
    sample = review.samples[sid]
    labels = review.segmentation.labels[sample.row]
    j = int(torch.bincount(labels.flatten(), minlength=len(sample.colors)).argmax())
    review.toggle(sid, sample.colors[j], reviewer="ana")
    assert [p.relative_to(run_dir).as_posix() for p in (run_dir / "review").rglob("*.json")] == ["review/j4.scripted/overrides.json"]

    code, _, err = compose(settings, run_dir, "--set", "report.enabled=false")
    assert code == EXIT_OK, err
    statuses = _statuses(err)
    for key in BRANCH_KEYS:
        assert statuses[f"judge.{key}"] == "reused"
        for base in ("overrides", "masks", "align"):
            assert statuses[f"{base}.{key}"] == ("computed" if key == "j4.scripted" else "reused"), (base, key)
    results = open_run(run_dir).results()
    assert {key: results["branches"][key]["review"]["overrides"] for key in BRANCH_KEYS} == {
        "j3.scripted": 0, "j3.oracle": 0, "j4.scripted": 1, "j4.oracle": 0,
    }  # fmt: skip
    # the branch's masks: what its judge gave, but for the toggled cluster
    run = open_run(run_dir)
    judge_masks, _ = masks_from_verdicts(review.segmentation.labels, run.load("judge.j4.scripted"))
    masks = run.load("masks.j4.scripted")["masks"]
    assert torch.equal(masks[sample.row] != judge_masks[sample.row], labels == j)


# -- uncertainty ------------------------------------------------------------------------------


def _reference_errors(critiques, verdicts) -> dict[int, int]:
    """Wrong verdicts per sample, counted from the scripted critic's own lines (``<colour>:
    covers N pixels, K on the true spurious feature``): a cluster with K > 0 should be "no"."""
    truth: dict[int, dict[str, tuple[int, int]]] = {}
    for c in critiques:
        if c.draw == 0:
            truth[c.sample_id] = {m[0]: (int(m[1]), int(m[2])) for m in re.findall(r"^(\w+): covers (\d+) pixels, (\d+) on", c.text, re.M)}
    out = {}
    for v in verdicts:
        if v.relevant is not None:
            out[v.sample_id] = sum(int(r == (truth[v.sample_id][c][1] > 0)) for c, r in zip(v.colors, v.relevant, strict=True) if truth[v.sample_id][c][0] > 0)
    return out


def test_three_answers_give_an_uncertainty_table_that_adds_up(run_dir: Path, settings: Path, compose):
    code, _, err = compose(settings, run_dir, "--set", "report.enabled=false")
    assert code == EXIT_OK, err
    run = open_run(run_dir)
    info = run.results()["uncertainty"]
    verdicts = {v.sample_id: v for v in run.load("overrides")}
    rows = info["per_sample"]
    assert info["answers_per_sample"] == 3 and info["samples"] == len(rows) == sum(v.ok for v in verdicts.values())
    assert [r["uncertainty"] for r in rows] == sorted((r["uncertainty"] for r in rows), reverse=True)
    assert all(r["uncertainty"] == verdicts[r["sample_id"]].uncertainty for r in rows)
    assert {r["sample_id"]: r["errors"] for r in rows} == _reference_errors(run.load("critic"), verdicts.values())
    assert info["errors"] == sum(r["errors"] for r in rows)
    assert info["top_samples"] == max(1, math.ceil(0.1 * info["samples"]))
    assert info["errors_in_top"] == sum(r["errors"] for r in rows[: info["top_samples"]])
    if info["errors"]:
        assert info["share_of_errors_in_top"] == pytest.approx(info["errors_in_top"] / info["errors"])
    assert info["errors"] > 0  # at an error rate of 0.3 the critic's majority errs somewhere


def test_one_answer_per_sample_has_no_uncertainty_table(run_dir: Path, settings: Path, compose):
    code, _, err = compose(settings, run_dir, "--set", "critic.samples=1", "--set", "report.enabled=false")
    assert code == EXIT_OK, err
    assert _statuses(err)["critic"] == "computed" and _statuses(err)["render"] == "reused"
    run = open_run(run_dir)
    results = run.results()
    assert "uncertainty" not in results
    assert results["review"] == {"overrides": 0, "changed": 0, "samples": 0}
    assert all(v.votes == () and v.uncertainty == 0.0 for v in run.load("judge"))
    assert len(run.load("critic")) == 6


def test_a_critic_without_errors_gives_the_truth_and_no_uncertainty(run_dir: Path, settings: Path, compose):
    code, _, err = compose(settings, run_dir, "--set", "critic.error_rate=0.0", "--set", "report.enabled=false")
    assert code == EXIT_OK, err
    results = open_run(run_dir).results()
    info = results["uncertainty"]
    assert info["errors"] == 0 and info["errors_in_top"] == 0 and info["share_of_errors_in_top"] is None
    assert all(r["uncertainty"] == 0.0 and r["errors"] == 0 for r in info["per_sample"])
    assert info["samples"] == 6
    confusion = results["verdicts"]["confusion"]
    assert confusion["fp"] == confusion["fn"] == 0 and results["verdicts"]["cluster_accuracy"] == 1.0


OPENAI = """
[critic]
plugin = "openai"
model = "test-critic"
base_url = "{url}"
api_key_env = ""
temperature = 0.7
samples = 3
max_attempts = 2
backoff_initial_s = 0.0
timeout_s = 10.0
"""


def test_the_openai_critic_asks_three_times_per_sample_once(run_dir: Path, tmp_path: Path, review_settings, compose):
    with ScriptedOpenAIServer() as server:
        settings = review_settings(tmp_path, critic=OPENAI.format(url=server.base_url), report=REPORT)
        code, _, err = compose(settings, run_dir, "--until", "judge")
        assert code == EXIT_OK, err
        statuses = _statuses(err)
        assert statuses["render"] == "reused" and statuses["critic"] == "computed"
        assert server.count == 3 * 6
        prompts = [json.dumps(r.body["messages"]) for r in server.requests]
        assert len(set(prompts)) == 6 and all(prompts.count(p) == 3 for p in prompts)
        with contextlib.closing(sqlite3.connect(tmp_path / "cache" / "responses.sqlite")) as db:
            assert db.execute("SELECT COUNT(DISTINCT key) FROM responses").fetchone()[0] == 18
        critiques = open_run(run_dir).load("critic")
        assert sorted((c.sample_id, c.draw) for c in critiques) == sorted((s, d) for s in {c.sample_id for c in critiques} for d in range(3))
        assert all(len(v.votes) == 3 for v in open_run(run_dir).load("judge"))

        # a re-run in a new run directory asks nothing: every answer is in the cache
        code, _, err = compose(settings, tmp_path / "again", "--until", "judge", "--quiet")
        assert code == EXIT_OK, err
        assert server.count == 18


    # answers that cannot differ, or that cannot have a majority, are refused before any work
    for change, says in (("critic.temperature=0", "samples = 3 needs temperature > 0"), ("critic.samples=2", "samples = 2: use an odd number")):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            assert main(["validate", str(settings), "--set", change]) == EXIT_BAD_INPUT
        assert says in err.getvalue() and "(critic plugin 'openai')" in err.getvalue()


# -- an attributor that cannot work on the model ------------------------------------------------


def test_a_grad_cam_layer_the_model_lacks_stops_before_training(tmp_path: Path, review_settings, compose):
    text = review_settings(tmp_path, report=REPORT).read_text(encoding="utf-8")
    text = text.replace('plugin = "mlp"\nhidden = [16]', 'plugin = "cnn"\nchannels = [4, 8]')
    text = text.replace('plugin = "deeplift-shap"\nbackground_size = 4', 'plugin = "grad-cam"\nlayer = "nope"')
    settings = tmp_path / "gradcam.toml"
    settings.write_text(text, encoding="utf-8")
    code, _, err = compose(settings, tmp_path / "run")
    assert code == EXIT_BAD_INPUT
    assert "[attributor] attributor.layer = 'nope'" in err and "has no layer of that name" in err
    assert "train" not in _statuses(err) or _statuses(err)["train"] != "computed"
    assert not (tmp_path / "run" / "train").exists()


def test_stopping_early_on_a_finished_run_keeps_its_results_unless_a_stage_before_recomputes(run_dir, settings, compose):
    code, _, _ = compose(settings, run_dir)
    assert code == EXIT_OK
    published = (run_dir / "results.json").read_bytes()
    # a stop for review recomputes nothing: what was published still matches the artifacts
    code, out, err = compose(settings, run_dir, "--until", "judge")
    assert code == EXIT_OK and "stopped after judge" in out
    assert (run_dir / "results.json").read_bytes() == published and (run_dir / "report.md").is_file()
    # a stage before the stop that recomputes (--refresh asks the critic again) makes them stale
    code, _, err = compose(settings, run_dir, "--until", "judge", "--refresh")
    assert code == EXIT_OK and _statuses(err)["critic"] == "computed"
    assert not (run_dir / "results.json").exists() and not (run_dir / "report.md").exists()
