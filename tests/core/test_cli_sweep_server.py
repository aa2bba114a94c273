"""``lvlmva sweep`` and ``lvlmva serve-test-lvlm``: listed in ``lvlmva --help``, every argument
with help, the sweep the same as ``python -m lvlmva.sweep``, and the scripted OpenAI-compatible
server as a process: its URL, answers the OpenAI critic and judge can use, its counts
(``GET /stats`` and on exit), its faults, and a clean exit on SIGINT / SIGTERM."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import pipeline_toys  # noqa: E402

from lvlmva import sweep as sweep_module  # noqa: E402
from lvlmva.cli import EXIT_BAD_INPUT, EXIT_OK, main  # noqa: E402
from lvlmva.registry import register_module  # noqa: E402
from lvlmva.testing.openai_server import synthetic_requests  # noqa: E402

COLORS = ("red", "blue", "green")


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == EXIT_OK
    return capsys.readouterr().out


def _option_help(text: str) -> dict[str, str]:
    """Each argument of an argparse help text -> its help (empty when it has none)."""
    out: dict[str, str] = {}
    name = None
    sections = re.split(
        r"^(?:positional arguments|options):$", text, maxsplit=1, flags=re.MULTILINE
    )
    for line in sections[1].splitlines():
        match = re.match(r"^  ([^\s,]+)(?:,? [^ ].*?)?(?:\s{2,}(.*))?$", line)
        if match and not line.startswith("   "):
            name = match.group(1)
            out[name] = match.group(2) or ""
        elif name is not None and line.startswith("   "):
            out[name] += " " + line.strip()
    return out


def test_help_lists_sweep_and_the_test_server(capsys):
    out = _help(["--help"], capsys)
    assert re.search(r"^    sweep\s+\S", out, re.MULTILINE)
    assert re.search(
        r"^    serve-test-lvlm\s*$\n\s+a scripted OpenAI-compatible", out, re.MULTILINE
    )


@pytest.mark.parametrize(
    ("command", "arguments"),
    [
        ("sweep", ["SETTINGS", "--lams", "--key", "--out", "--set"]),
        (
            "serve-test-lvlm",
            [
                "--host",
                "--port",
                "--fault-rate",
                "--fault-kinds",
                "--seed",
                "--latency",
                "--retry-after",
                "--fault-delay",
                "--batch-delay",
            ],
        ),
    ],
)
def test_every_argument_has_help(command, arguments, capsys):
    helps = _option_help(_help([command, "--help"], capsys))
    for argument in arguments:
        assert helps.get(argument, "").strip(), f"{command} {argument} has no help: {helps}"
    assert set(helps) == {"-h", *arguments}


def _settings(tmp_path: Path) -> Path:
    path = tmp_path / "toy.toml"
    cache = (tmp_path / "cache").as_posix()
    path.write_text(
        pipeline_toys.TOY_SETTINGS.replace("[run]\n", f'[run]\ncache_dir = "{cache}"\n', 1)
    )
    return path


def test_lvlmva_sweep_prints_what_the_module_form_prints(tmp_path, fresh_plugins, capsys):
    register_module(pipeline_toys, "toys")
    settings = _settings(tmp_path)
    common = [
        str(settings),
        "--key",
        "aligner.shift",
        "--lams",
        "0",
        "2.5",
        "--set",
        "train.epochs=1",
    ]
    assert main(["sweep", *common, "--out", str(tmp_path / "a")]) == EXIT_OK
    command = capsys.readouterr().out
    assert sweep_module.main([*common, "--out", str(tmp_path / "b")]) == EXIT_OK
    module = capsys.readouterr().out
    assert command.replace(str(tmp_path / "a"), "OUT") == module.replace(str(tmp_path / "b"), "OUT")
    assert command.startswith("| lambda | ") and "| 2.5 | " in command
    assert (tmp_path / "a" / "sweep.md").read_text() == (tmp_path / "b" / "sweep.md").read_text()
    assert [p.name for p in sorted((tmp_path / "a").glob("lam_*"))] == ["lam_0.0", "lam_2.5"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lams"], "expected at least one argument"),
        (["--lams", "ten"], "invalid float value: 'ten'"),
        (["--lams", "1", "nan"], "--lams: every value must be a finite number, got nan"),
        (
            ["--lams", "1", "10", "1"],
            "--lams: each value once (one run directory each), repeated: 1",
        ),
        (["--lams", "1", "--key", "aligner.shfit"], "aligner.shfit"),
        (["--lams", "1", "--set", "train.epohcs=1"], "did you mean 'epochs'?"),
    ],
)
def test_bad_sweep_input_exits_2_before_any_run(argv, message, tmp_path, fresh_plugins, capsys):
    register_module(pipeline_toys, "toys")
    args = [
        "sweep",
        str(_settings(tmp_path)),
        "--key",
        "aligner.shift",
        *argv,
        "--out",
        str(tmp_path / "s"),
    ]
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_sweep_needs_settings_in_the_command_but_not_in_the_module_form(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", "--lams", "1"])
    assert exit_.value.code == EXIT_BAD_INPUT
    assert "the following arguments are required: SETTINGS" in capsys.readouterr().err
    import argparse

    parser = argparse.ArgumentParser()
    sweep_module.add_arguments(parser, settings_required=False)
    assert parser.parse_args([]).settings == Path(
        "examples/decoy_mnist.toml"
    )  # as `nox -s sweep` runs it


# -- the test server as a process ---------------------------------------------------------------


class _Served:
    def __init__(self, argv: list[str]) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LVLMVA_")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        line = self.process.stdout.readline().strip()  # the first line: the base URL
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", line), (
            line,
            self.process.stderr.read() if self.process.poll() is not None else "",
        )
        self.base_url = line
        self.port = urlsplit(line).port

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request(
            method,
            path,
            body=json.dumps(body) if body is not None else None,
            headers={"Content-Type": "application/json"},
        )
        response = conn.getresponse()
        payload = json.loads(response.read())
        conn.close()
        return response.status, payload

    def stop(self, sig: int = signal.SIGINT) -> tuple[int, str, str]:
        self.process.send_signal(sig)
        out, err = self.process.communicate(timeout=20)
        return self.process.returncode, out, err


@pytest.fixture
def served():
    started: list[_Served] = []

    def start(*argv: str) -> _Served:
        started.append(_Served(list(argv)))
        return started[-1]

    yield start
    for s in started:
        if s.process.poll() is None:
            s.process.kill()
            s.process.communicate()


def test_the_server_answers_the_openai_critic_and_judge_counts_and_stops_on_sigint(served, ctx):
    from lvlmva.plugins.lvlm.openai_backend import OpenAICritic, OpenAIJudge

    server = served("lvlmva", "serve-test-lvlm", "--port", "0")
    fast = dict(
        base_url=server.base_url,
        api_key_env="",
        timeout_s=10.0,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
    )
    critiques = OpenAICritic(OpenAICritic.Options(model="critic-x", **fast)).critique(
        synthetic_requests(2, COLORS), ctx
    )
    assert all(c.failure is None and c.text.count("Verdict:") == len(COLORS) for c in critiques)
    verdicts = OpenAIJudge(OpenAIJudge.Options(model="judge-x", **fast)).judge(critiques, ctx)
    assert all(
        v.failure is None and v.relevant is not None and len(v.relevant) == len(COLORS)
        for v in verdicts
    )

    status, stats = server.request("GET", "/stats")
    assert status == 200
    assert stats["by_endpoint"] == {"POST /v1/chat/completions": {"total": 4, "200": 4}}
    assert stats["chat_completions"]["by_model"] == {"critic-x": 2, "judge-x": 2}
    assert stats["chat_completions"]["answered"] == 4 and stats["requests"] == 4
    assert server.request("GET", "/stats")[1] == stats  # reading the counts does not change them
    assert server.request("GET", "/v1/nowhere")[0] == 404
    code, out, err = server.stop(signal.SIGINT)
    assert code == 0, err
    summary = json.loads(out.split("request counts (as GET /stats returned them):\n", 1)[1])
    assert summary["by_endpoint"]["GET /v1/nowhere"] == {"total": 1, "404": 1}
    assert summary["chat_completions"] == stats["chat_completions"]
    assert "Traceback" not in err


@pytest.mark.parametrize(("kinds", "status"), [("500", 500), ("429", 429)])
def test_fault_flags_take_effect_and_sigterm_stops(kinds, status, served):
    server = served(
        "lvlmva.testing.openai_server",
        "--port",
        "0",
        "--fault-rate",
        "1",
        "--fault-kinds",
        kinds,
        "--retry-after",
        "3",
    )
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "Red, blue: which is relevant?"}],
    }
    got, payload = server.request("POST", "/v1/chat/completions", body)
    assert got == status and "scripted" in payload["error"]["message"]
    stats = server.request("GET", "/stats")[1]
    assert stats["chat_completions"]["by_fault"] == {kinds: 1}
    assert stats["by_endpoint"]["POST /v1/chat/completions"] == {"total": 1, str(status): 1}
    code, _out, err = server.stop(signal.SIGTERM)
    assert code == 0, err


def test_a_prose_fault_answers_without_verdicts(served):
    server = served(
        "lvlmva.testing.openai_server", "--port", "0", "--fault-rate", "1", "--fault-kinds", "prose"
    )
    body = {"model": "m", "messages": [{"role": "user", "content": "red, blue"}]}
    status, payload = server.request("POST", "/v1/chat/completions", body)
    assert status == 200 and "Verdict" not in payload["choices"][0]["message"]["content"]
    server.stop()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--fault-rate", "1.5"], "--fault-rate must be between 0 and 1, got 1.5"),
        (["--fault-kinds", "500,502"], "--fault-kinds: unknown kind(s) 502; known: 429, 500"),
        (["--latency", "-1"], "--latency must be >= 0"),
        (["--port", "70000"], "--port must be between 0 and 65535"),
    ],
)
def test_bad_server_arguments_exit_2(argv, message, capsys):
    assert main(["serve-test-lvlm", *argv]) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err


def test_a_port_in_use_exits_2(served, capsys):
    server = served("lvlmva.testing.openai_server", "--port", "0")
    started = time.monotonic()
    assert main(["serve-test-lvlm", "--port", str(server.port)]) == EXIT_BAD_INPUT
    assert f"cannot listen on 127.0.0.1:{server.port}" in capsys.readouterr().err
    assert time.monotonic() - started < 5
    server.stop()


def test_stats_name_routes_without_ids_and_count_dropped_connections():
    from lvlmva.testing.openai_server import ScriptedOpenAIServer

    body = {"model": "m", "messages": [{"role": "user", "content": "red"}]}
    with ScriptedOpenAIServer(faults=["disconnect", None]) as server:
        for method, path, payload in [
            ("POST", "/v1/chat/completions", body),
            ("POST", "/v1/chat/completions", body),
            ("GET", "/v1/batches/batch_abc", None),
            ("POST", "/v1/batches/batch_abc/cancel", None),
            ("GET", "/v1/models", None),
        ]:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
            conn.request(method, path, body=json.dumps(payload) if payload else None)
            try:
                conn.getresponse().read()
            except (http.client.RemoteDisconnected, ConnectionResetError):
                pass
            conn.close()
        stats = server.stats()
    assert stats["by_endpoint"] == {
        "GET /v1/batches/{id}": {"total": 1, "404": 1},
        "GET /v1/models": {"total": 1, "200": 1},
        "POST /v1/batches/{id}/cancel": {"total": 1, "404": 1},
        "POST /v1/chat/completions": {"total": 2, "200": 1, "dropped": 1},
    }
    assert stats["requests"] == 5
    assert stats["chat_completions"] == {
        "total": 2,
        "by_model": {"m": 2},
        "by_fault": {"disconnect": 1},
        "answered": 1,
    }
