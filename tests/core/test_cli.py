"""The ``lvlmva`` command: exit codes (0 ok, 2 bad input before any work) and what it prints.
Exit 1 on a failing stage is covered with the pipeline's tests."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lvlmva import __version__
from lvlmva.cli import EXIT_BAD_INPUT, EXIT_OK, main
from lvlmva.protocols import ROLES


@pytest.fixture
def misspelled(tmp_path: Path) -> Path:
    path = tmp_path / "misspelled.toml"
    path.write_text("[train]\nepohcs = 2\n")
    return path


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == EXIT_OK
    assert capsys.readouterr().out.strip() == f"lvlmva {__version__}"


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == EXIT_BAD_INPUT
    out = capsys.readouterr().out
    assert out.startswith("usage: lvlmva")
    for command in ("compose", "validate", "plugins"):
        assert command in out


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["composee"])
    assert exit_.value.code == EXIT_BAD_INPUT
    assert "invalid choice: 'composee'" in capsys.readouterr().err


def test_validate_names_a_misspelled_key(misspelled, capsys):
    assert main(["validate", str(misspelled)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith(f"lvlmva: error: {misspelled}: train.epohcs = 2: unknown key; did you mean 'epochs'? allowed keys: ")
    assert "epochs" in err


def test_validate_exit_code_in_a_real_process(misspelled, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LVLMVA_")}
    env["LVLMVA_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "lvlmva.cli", "validate", str(misspelled), "--set", "train.lr=-1"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == EXIT_BAD_INPUT
    assert "train.epohcs = 2: unknown key" in result.stderr
    assert "--set train.lr: train.lr = -1" in result.stderr
    assert "Traceback" not in result.stderr


def test_validate_ok_prints_the_plan(toy_registered, capsys):
    import torch

    deterministic = torch.are_deterministic_algorithms_enabled()
    assert main(["validate", str(toy_registered)]) == EXIT_OK
    assert torch.are_deterministic_algorithms_enabled() == deterministic  # loading the data set left no trace
    out = capsys.readouterr().out
    # the data set was loaded and checked, and says what it holds
    assert re.fullmatch(rf"{re.escape(str(toy_registered))}: ok \(data: train \d+, (val \d+, )?test \d+ images of .*; checked\)", out.splitlines()[0])
    assert re.search(r"\n  train +pending \[mlp\]", out)
    assert re.search(r"\n  evaluate\.accuracy +pending \[toy-eval\]", out)
    assert re.search(r"\n  critic +skipped: no \[critic\] plugin configured", out)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=-1", "--set train.epochs: train.epochs = -1"),
        ("dataset.plugin=nope", "unknown dataset plugin 'nope'; registered: "),
        ("run.device=cuda:7", "run.device: 'cuda:7'"),  # spelled right; no such device here
    ],
)
def test_compose_with_bad_input_exits_2_before_creating_the_run_directory(
    toy_registered, tmp_path, capsys, override, message
):
    if override == "run.device=cuda:7":
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > 7:
            pytest.skip("this machine has a cuda:7")
    run_dir = tmp_path / "run"
    code = main(["compose", str(toy_registered), "--out", str(run_dir), "--set", override])
    assert code == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert not run_dir.exists()


def test_compose_with_roles_that_do_not_fit_exits_2(toy_registered, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["compose", str(toy_registered), "--out", str(run_dir), "--set", "judge.plugin=rules"])
    assert code == EXIT_BAD_INPUT
    assert "[judge] is set but [critic] is not" in capsys.readouterr().err
    assert not run_dir.exists()


def test_dry_run_plans_without_creating_the_run_directory(toy_registered, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["compose", str(toy_registered), "--out", str(run_dir), "--dry-run"]) == EXIT_OK
    out = capsys.readouterr().out
    assert f"run directory: {run_dir}" in out
    assert re.search(r"\n  train +would compute \[mlp\]", out)
    assert re.search(r"\n  align +skip: no \[aligner\] plugin configured", out)
    assert not run_dir.exists()


def _tree(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 (or "dir") of everything under ``root``, with modes."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        mode = oct(path.stat().st_mode)
        out[rel] = ("dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()) + mode
    return out


def test_compose_into_a_folder_that_is_not_ours_exits_2_and_touches_nothing(toy_registered, tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "figures").mkdir(parents=True)
    (mine / "figures" / "plot.png").write_bytes(b"my plot")
    (mine / "train").mkdir()
    (mine / "train" / "notes.txt").write_text("my notes")
    (mine / "results.json").write_text("{}")
    before = _tree(mine)
    for command in (["compose"], ["compose", "--dry-run"]):
        code = main([*command, str(toy_registered), "--out", str(mine)])
        assert code == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert f"{mine} exists, is not empty and is not an lvlmva run directory" in err
        assert _tree(mine) == before


@pytest.mark.parametrize("kind", ["file", "under-a-file"])
def test_compose_with_an_out_that_cannot_be_a_folder_exits_2(toy_registered, tmp_path, capsys, kind):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    out = blocker if kind == "file" else blocker / "run"
    assert main(["compose", str(toy_registered), "--out", str(out)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert ("is not a folder" if kind == "file" else f"{blocker} is a file") in err
    assert blocker.read_text() == "a file"


def test_bad_input_in_a_real_process_prints_no_traceback(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b"[run]\nname = \"caf\xe9\"\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LVLMVA_")}
    env["LVLMVA_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    examples = Path(__file__).resolve().parents[2] / "examples"
    for argv in (
        ["compose", str(examples / "decoy_mnist.toml"), "--out", str(blocker / "run")],
        ["validate", str(latin)],
        ["compose", str(examples / "decoy_mnist.toml"), "--out", str(tmp_path / "x"), "--set", "critic.plugin=openai", "--set", "critic.base_url=http://u:secret@h/v1"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "lvlmva.cli", *argv], env=env, cwd=tmp_path,
            capture_output=True, text=True, timeout=120, check=False,
        )
        assert result.returncode == EXIT_BAD_INPUT, result.stderr
        assert result.stderr.startswith("lvlmva: error: ") and "Traceback" not in result.stderr
        assert "secret" not in result.stderr


def test_an_interrupted_run_says_what_was_kept(toy_registered, tmp_path, capsys, monkeypatch):
    from lvlmva.pipeline import Pipeline

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Pipeline, "run", interrupted)
    assert main(["compose", str(toy_registered), "--out", str(tmp_path / "run"), "--quiet"]) == 130
    assert "interrupted; finished stages are kept" in capsys.readouterr().err


def test_compose_into_an_empty_folder_marks_it_and_reruns_in_it(toy_registered, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["compose", str(toy_registered), "--out", str(empty), "--quiet"]) == EXIT_OK
    assert (empty / ".lvlmva-run").is_file() and (empty / "results.json").is_file()
    assert main(["compose", str(toy_registered), "--out", str(empty), "--quiet"]) == EXIT_OK


@pytest.mark.parametrize(
    "content, message",
    [
        (b"[run]\nname = \"caf\xe9\"\n", "not UTF-8 text (byte 17 is 0xe9); save the settings file as UTF-8"),
        (b"[run]\nname = \"../elsewhere\"\n", "run.name = '../elsewhere': Value error, must be one folder name"),
        (b"[evaluator]\nplugin = \"standard\"\n", "[evaluator] is written [evaluators.<name>] now"),
    ],
)
def test_bad_settings_files_exit_2_with_a_message(tmp_path, capsys, content, message):
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    assert main(["validate", str(path)]) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err


def test_plugins_lists_every_role(capsys, fresh_plugins):
    assert main(["plugins"]) == EXIT_OK
    out = capsys.readouterr().out
    first_column = {line.split("│")[1].strip() for line in out.splitlines() if line.startswith("│")}
    assert set(ROLES) <= first_column
    assert " mlp " in out and " lvlmva " in out


def test_plugins_of_one_role(capsys, fresh_plugins):
    assert main(["plugins", "--role", "critic"]) == EXIT_OK
    out = capsys.readouterr().out
    first_column = {line.split("│")[1].strip() for line in out.splitlines() if line.startswith("│")}
    assert first_column == {"critic"}
    assert " oracle " in out and " decoy-mnist " not in out


def test_plugins_with_an_unknown_role_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["plugins", "--role", "critics"])
    assert exit_.value.code == EXIT_BAD_INPUT


# -- failures a developer can debug, plugin contracts, what a run directory refuses ------------


def _register_evaluator(name: str, cls: type) -> None:
    """Register ``cls`` as evaluator ``name`` from a distribution called ``bad-dist`` 9.9."""
    import types

    from lvlmva import hookimpl
    from lvlmva.registry import register_module

    module = types.ModuleType(f"plugin_{name.replace('-', '_')}")

    @hookimpl
    def lvlmva_register(registry):
        registry.add("evaluator", name, cls)

    module.lvlmva_register = lvlmva_register
    register_module(module, name, distribution="bad-dist", version="9.9")


def _toy_evaluator_base():
    from lvlmva_toy.evaluate import AccuracyEvaluator

    return AccuracyEvaluator


def _compose_args(settings: Path, run_dir: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["compose", str(settings), "--out", str(run_dir), "--set", f"run.cache_dir={(tmp_path / 'cache').as_posix()!r}", *extra]


def test_a_plugin_that_raises_leaves_its_traceback_in_a_file_the_cli_names(toy_registered, tmp_path, capsys):
    base = _toy_evaluator_base()

    class Raising(base):
        def evaluate(self, model, data, ctx, attribute=None):
            return self._inner(model)

        def _inner(self, model):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    _register_evaluator("raising", Raising)
    run_dir = tmp_path / "run"
    args = _compose_args(toy_registered, run_dir, tmp_path, "--set", "evaluators.accuracy.plugin=raising")
    assert main(args) == 1
    err = capsys.readouterr().err
    error_file = run_dir / "logs" / "evaluate.accuracy.error.txt"
    assert f"traceback: {error_file}" in err  # on the stage line and in the final message
    assert err.count(str(error_file)) == 2 and "Traceback (most recent call last)" not in err
    text = error_file.read_text()
    assert "in _inner" in text and "RuntimeError: mat1 and mat2 shapes cannot be multiplied" in text
    # --debug prints it as well, and the run goes on as before
    assert main([*args, "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in _inner" in err
    assert "= train" in err  # kept and reused


def test_a_plugin_that_cannot_be_built_or_called_exits_2_before_any_work(toy_registered, tmp_path, capsys):
    base = _toy_evaluator_base()

    class NoOptions(base):
        def __init__(self):  # not __init__(self, options)
            pass

    class WrongEvaluate(base):
        def evaluate(self, model, data):  # the pipeline passes ctx and attribute= too
            return {}

    class Refusing(base):
        def __init__(self, options):
            raise ValueError("needs a licence file")

    for name, cls in (("no-options", NoOptions), ("wrong-evaluate", WrongEvaluate), ("refusing", Refusing)):
        _register_evaluator(name, cls)
    run_dir = tmp_path / "run"
    cases = {
        "no-options": ["does not fit the evaluator protocol", "cannot be called as NoOptions(options)"],
        "wrong-evaluate": ["does not fit the evaluator protocol", "evaluate(self, model, data) cannot be called as evaluate(self, model, data, ctx, attribute=...)"],
        "refusing": ["cannot be built from its options: ValueError: needs a licence file", "Refusing(options)"],
    }
    for name, expected in cases.items():
        code = main(_compose_args(toy_registered, run_dir, tmp_path, "--set", f"evaluators.accuracy.plugin={name}"))
        err = capsys.readouterr().err
        assert code == EXIT_BAD_INPUT, err
        assert f"evaluator plugin {name!r}" in err and "bad-dist 9.9" in err
        for text in expected:
            assert text in err
        assert "Traceback" not in err
        assert not (run_dir / "train").exists()  # nothing trained


def test_a_symbolic_link_in_the_run_directory_is_refused_and_its_target_untouched(toy_registered, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = _compose_args(toy_registered, run_dir, tmp_path)
    assert main(args) == EXIT_OK
    capsys.readouterr()
    precious = tmp_path / "precious.txt"
    for name in (".lock", "metrics.jsonl"):
        precious.write_text("the user's text\n")
        (run_dir / name).unlink(missing_ok=True)
        (run_dir / name).symlink_to(precious)
        assert main([*args, "--recompute", "train"]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert str(run_dir / name) in err and "symbolic link" in err
        assert precious.read_text() == "the user's text\n"  # neither truncated nor appended to
        (run_dir / name).unlink()
    # the lower layer refuses too, should a link appear during a run
    from lvlmva.atomic import SymlinkRefused, append_line, open_lock_file

    (run_dir / "metrics.jsonl").symlink_to(precious)
    with pytest.raises(SymlinkRefused, match="symbolic link"):
        append_line(run_dir / "metrics.jsonl", "{}")
    (run_dir / ".lock").symlink_to(precious)
    with pytest.raises(SymlinkRefused):
        open_lock_file(run_dir / ".lock")
    assert precious.read_text() == "the user's text\n"


def test_a_full_disk_names_the_file_and_leaves_the_stage_unfinished(toy_registered, tmp_path, capsys, monkeypatch):
    """torch.save reports a full disk as ``[enforce fail at inline_container.cc:672]``, Python
    as a bare ``[Errno 28]``: the message names the file and says the disk is full."""
    import errno
    import shutil as shutil_module
    from collections import namedtuple

    import torch

    run_dir = tmp_path / "run"
    args = _compose_args(toy_registered, run_dir, tmp_path)
    usage = namedtuple("usage", "total used free")
    real_save = torch.save

    def full_save(obj, path, *a, **kw):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", full_save)
    monkeypatch.setattr(shutil_module, "disk_usage", lambda _p: usage(10**9, 10**9 - 4096, 4096))
    assert main(args) == 1
    err = capsys.readouterr().err
    assert re.search(rf"cannot write {re.escape(str(run_dir))}/\.partial-train/\S+: the disk is full \(4096 bytes left", err)
    assert "enforce fail" not in err
    assert not (run_dir / "train" / "fingerprint.json").exists()
    # Python's bare ENOSPC, without a file name, gets one
    monkeypatch.setattr(torch, "save", real_save)
    from lvlmva.atomic import write_error

    message = str(write_error(run_dir / "x.json", OSError(errno.ENOSPC, "No space left on device")))
    assert "cannot write" in message and "x.json" in message and "the disk is full" in message
    # with room again, the stage is computed as if nothing happened
    monkeypatch.undo()
    assert main(args) == EXIT_OK
    assert "+ train" in capsys.readouterr().err


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_really_full_disk_is_named(toy_registered, tmp_path, tiny_disk, capsys):
    run_dir = tiny_disk / "run"
    args = _compose_args(toy_registered, run_dir, tmp_path)
    assert main([*args, "--until", "train"]) == EXIT_OK
    capsys.readouterr()
    # fill the disk, then ask for work that writes
    filler = tiny_disk / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass
    assert main([*args, "--recompute", "train"]) == 1
    err = capsys.readouterr().err
    assert "the disk is full" in err and str(run_dir) in err and "[Errno 28]" not in err
    filler.unlink()
    assert main(args) == EXIT_OK


def test_validate_imports_each_plugins_optional_dependency(tmp_path, capsys, monkeypatch):
    settings = Path(__file__).resolve().parents[2] / "examples" / "synthetic_skin.toml"
    for name in ("medmnistc", "medmnistc.corruptions", "medmnistc.corruptions.registry"):
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    assert main(["validate", str(settings), "--no-data"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "evaluator plugin 'medmnist-c'" in err and "'medmnistc.corruptions.registry'" in err
    assert 'pip install -e ".[medmnistc]"' in err and "apt-get install libmagickwand-6.q16-6" in err
