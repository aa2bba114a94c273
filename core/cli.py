"""The ``lvlmva`` command.

Exit codes: 0 success; 2 bad input (settings, plugin names, combinations, an output folder that
is not ours), before any work; 1 failure during a run (the stage is named and the run directory
kept); 130 interrupted (finished stages kept).
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path

from .atomic import DiskFull, SymlinkRefused
from .export import FORMATS
from .pipeline import ArtifactError, Pipeline, PublishError, RunDirectory, StageFailed
from .pipeline.errors import describe_failure
from .protocols import ROLES
from .registry import PluginError, get_registry
from .results import summary_lines
from .settings import SettingsError, load_settings
from .sweep import add_arguments as add_sweep_arguments
from .testing.openai_server import add_arguments as add_server_arguments
from .version import __version__

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lvlmva",
        description="LVLM-aided visual alignment: explain a vision model, let an LVLM critic judge "
        "the explanation against an expert's class descriptions, and fine-tune the model away from "
        "what was judged spurious.",
        epilog="Settings precedence: --set > LVLMVA_SECTION__KEY environment > settings file > defaults.",
    )
    parser.add_argument("--version", action="version", version=f"lvlmva {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add_settings_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("settings", type=Path, metavar="SETTINGS", help="a TOML settings file")
        p.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
            help="override one setting (repeatable); VALUE is a TOML literal or a bare string",
        )

    compose = sub.add_parser("compose", help="run the pipeline of a settings file")
    add_settings_args(compose)
    compose.add_argument("--out", type=Path, metavar="DIR", help="run directory (default: run.out_dir/run.name)")
    compose.add_argument("--dry-run", action="store_true", help="validate and print which stages would run, reuse or skip")
    compose.add_argument("--refresh", action="store_true", help="ignore cached LVLM responses and ask again")
    compose.add_argument(
        "--retry-invalid", action="store_true",
        help="ask the LVLM critics and judges once more for the requests whose unusable answers reached their "
        "max_invalid_attempts (the samples recorded as failures); sets retry_invalid for this run",
    )
    compose.add_argument("--quiet", action="store_true", help="no progress bars or stage lines")
    compose.add_argument(
        "--until", metavar="STAGE",
        help="stop after this stage (e.g. judge: review the verdicts with `lvlmva review`, then compose again; "
        "data: load and check the data set)",
    )
    compose.add_argument(
        "--recompute", metavar="STAGE[,STAGE]", action="append", default=[],
        help="recompute these stages and every stage that reads them, even when their fingerprints match "
        "(LVLM answers still come from the response cache: add --refresh to ask again)",
    )
    compose.add_argument("--debug", action="store_true", help="print the traceback of every failed stage (always written to RUN/logs/STAGE.error.txt)")

    review = sub.add_parser(
        "review", help="a local web page to check and correct a run's verdicts (review/overrides.json; with several "
        "segmenters or critics, review/BRANCH/overrides.json per segmenter x critic pair)",
    )
    review.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory whose judge stage has finished")
    review.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    review.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free port)")
    review.add_argument("--read-only", action="store_true", help="show the verdicts without allowing changes")
    review.add_argument("--reviewer", default="", help="name recorded with each override")
    review.add_argument("--no-browser", action="store_true", help="do not open a browser, only print the address")
    review.add_argument(
        "--branch", metavar="KEY",
        help="in a run with several segmenters or critics, open on this segmenter x critic pair (e.g. j5.gpt4o; "
        "default: the first judged); the page switches between them, each with its own review/KEY/overrides.json",
    )

    validate = sub.add_parser(
        "validate", help="check a settings file, its plugins and their dependencies, and load and check the data set, without training",
    )
    add_settings_args(validate)
    validate.add_argument("--no-data", action="store_true", help="check the settings and plugins only; do not load the data set")
    validate.add_argument("--debug", action="store_true", help="print the traceback when the data set fails to load")

    study = sub.add_parser("study", help="seeds x methods from settings files with a [study] section: table, statistics, plots")
    study.add_argument("settings", type=Path, nargs="+", metavar="SETTINGS", help="one settings file per data set (side by side in the table)")
    study.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one setting in every settings file (repeatable), e.g. study.seeds=[0,1,2]",
    )
    study.add_argument("--out", type=Path, metavar="DIR", help="study directory (default: study.out_dir/study.name)")
    study.add_argument("--debug", action="store_true", help="print the traceback of every failed cell (always written to STUDY/logs/)")

    sweep = sub.add_parser(
        "sweep", help="a sweep of one setting (the aligner's lambda): a run directory per value, a table and a plot",
        description="Run the settings once per value of one setting (by default aligner.lam): the stages before "
        "alignment and the baselines are computed once and reused; writes DIR/lam_VALUE per value, sweep.md, "
        "sweep.json and sweep.png. Exit 1 when a value failed (recorded in the table, the others still run).",
    )
    add_sweep_arguments(sweep)

    export = sub.add_parser(
        "export", help="the tables of a finished study or compose run as LaTeX (booktabs), CSV or markdown",
    )
    export.add_argument("path", type=Path, metavar="RUN_OR_STUDY", help="a study directory or a finished compose run directory")
    export.add_argument("--format", required=True, choices=FORMATS, help="the format of the tables")
    export.add_argument("--out", type=Path, metavar="FILE", help="write to FILE (default: print to stdout)")

    plugins = sub.add_parser("plugins", help="list every role's plugins and where they come from")
    plugins.add_argument("--role", choices=list(ROLES), help="only this role")

    serve_test = sub.add_parser(
        "serve-test-lvlm",
        help="a scripted OpenAI-compatible test server (not an LVLM) to try a pipeline's critic and judge offline",
        description="Serve the scripted OpenAI-compatible server of lvlmva.testing until Ctrl-C: critic requests "
        "(with images) get one 'Verdict: yes|no' paragraph per cluster colour, judge requests the matching JSON, "
        "with the faults asked for. Prints its base URL (point critic.base_url and judge.base_url at it); GET "
        "/stats returns the request counts, which are also printed on exit.",
    )
    add_server_arguments(serve_test)
    return parser


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE") and argv is None:
        # `lvlmva validate x.toml | head` should end quietly, not with a traceback.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return EXIT_BAD_INPUT
    try:
        return {"compose": _compose, "validate": _validate, "plugins": _plugins, "study": _study, "review": _review, "export": _export,
                "sweep": _sweep, "serve-test-lvlm": _serve_test_lvlm}[args.command](args)
    except (SettingsError, PluginError) as exc:
        print(f"lvlmva: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _pipeline(args: argparse.Namespace, quiet: bool = True) -> Pipeline:
    settings = load_settings(args.settings, args.overrides)
    if getattr(args, "retry_invalid", False):
        slots = [c.slot for role in ("critic", "judge") for c in settings.choices(role) if "retry_invalid" in type(c.options).model_fields]
        if not slots:
            raise SettingsError("--retry-invalid: no critic or judge of these settings counts unusable answers (max_invalid_attempts)")
        settings = load_settings(args.settings, [*args.overrides, *(f"{slot}.retry_invalid=true" for slot in slots)])
    out = getattr(args, "out", None) or Path(settings.run.out_dir) / settings.run_name
    RunDirectory.check(out)  # a folder that is not ours is refused before anything is built
    echo = (lambda _msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr))
    recompute = [name.strip() for item in getattr(args, "recompute", []) for name in item.split(",")]
    return Pipeline(
        settings, out, refresh=getattr(args, "refresh", False),
        progress=not quiet and sys.stderr.isatty(), echo=echo, until=getattr(args, "until", None),
        recompute=recompute, debug=getattr(args, "debug", False),
    )


def _print_plan(pipeline: Pipeline, words: dict[str, str]) -> None:
    """One line per stage: what a run would do with it, its plugins, and why it is skipped."""
    stages = {s.name: s for s in pipeline.stages}
    width = max(len(name) for name in stages)
    for outcome in pipeline.plan():
        stage = stages[outcome.name]
        names = [pipeline.settings.plugins[s].name for s in stage.required_plugins if s in pipeline.settings.plugins]
        plugin = f" [{', '.join(names)}]" if names else ""
        note = f": {outcome.reason}" if outcome.reason else f"  ({stage.summary})"
        print(f"  {outcome.name:<{width}} {words.get(outcome.status, outcome.status)}{plugin}{note}")


def _validate(args: argparse.Namespace) -> int:
    pipeline = _pipeline(args)
    problems = pipeline.import_problems()  # every plugin's, also those a finished run would reuse
    if problems:
        print("lvlmva: error: " + "\n".join(problems), file=sys.stderr)
        return EXIT_BAD_INPUT
    if not args.no_data:
        try:
            loaded = pipeline.check_data()
        except StageFailed as exc:
            for name, cause in exc.failures.items():
                print(f"lvlmva: stage {name!r} failed: {describe_failure(cause)}", file=sys.stderr)
            if not args.debug:
                print("lvlmva: run again with --debug for the traceback", file=sys.stderr)
            return EXIT_FAILED
    print(f"{args.settings}: ok" + ("" if args.no_data else f" ({loaded})" if loaded else ""))
    _print_plan(pipeline, {})
    return EXIT_OK


def _compose(args: argparse.Namespace) -> int:
    pipeline = _pipeline(args, quiet=args.quiet)
    if args.dry_run:
        print(f"run directory: {pipeline.run_dir}")
        _print_plan(pipeline, {"pending": "would compute", "reused": "would reuse", "skipped": "skip"})
        return EXIT_OK
    if not args.quiet:
        print(f"lvlmva {__version__}: run directory {pipeline.run_dir}", file=sys.stderr)
    try:
        results = pipeline.run()
    except StageFailed as exc:
        for name, cause in exc.failures.items():
            where = exc.error_files.get(name)
            print(f"lvlmva: stage {name!r} failed: {describe_failure(cause)}" + (f"\n        traceback: {where}" if where else ""), file=sys.stderr)
        print(f"lvlmva: the run directory keeps every finished stage; run again to resume: {exc.run_dir}", file=sys.stderr)
        return EXIT_FAILED
    except (PublishError, ArtifactError) as exc:
        print(f"lvlmva: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (DiskFull, SymlinkRefused) as exc:  # their message names the file and the cause
        print(f"lvlmva: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:  # the run directory itself (a folder in the way, no permission)
        if exc.filename and str(exc.strerror or "").startswith("cannot write"):
            print(f"lvlmva: {exc.strerror}", file=sys.stderr)
        else:
            print(f"lvlmva: cannot write the run directory: {exc.filename or pipeline.run_dir}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"lvlmva: interrupted; finished stages are kept, run again to resume: {pipeline.run_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.until:
        shown = args.until if args.until == pipeline.until else f"{args.until} ({pipeline.until}, the last of them)"
        print(f"stopped after {shown} (--until): the stages before are kept for the next compose")
        if pipeline.until.split(".")[0] in ("judge", "overrides"):
            print(f"review the verdicts:  lvlmva review {pipeline.run_dir}")
            again = [str(args.settings), *(f"--set {shlex.quote(o)}" for o in args.overrides), *(["--out", str(args.out)] if args.out else [])]
            print(f"then go on:           lvlmva compose {' '.join(again)}")
        return EXIT_OK
    summary = summary_lines(results)
    if summary:
        print("\n".join(summary))
    print(f"results: {pipeline.run_dir / 'results.json'}")
    report = pipeline.run_dir / "report.md"
    if report.exists():
        print(f"report:  {report}")
    return EXIT_OK




def _study(args: argparse.Namespace) -> int:
    from .study.runner import run_study

    def echo(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        summary = run_study(args.settings, args.overrides, args.out, echo=echo, debug=args.debug)
    except KeyboardInterrupt:
        print("lvlmva: study interrupted; finished cells and stages are kept, run again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    directory = Path(summary["directory"])
    for name in ("table.md", "stats.md", "results.csv"):
        print(f"{name.split('.')[0] + ':':<8} {directory / name}")
    if summary["failed"]:
        print(f"lvlmva: {summary['failed']} of {summary['cells']} cells failed; their reasons are in {directory / 'table.md'}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _sweep(args: argparse.Namespace) -> int:
    from .sweep import run

    return run(args, prog="lvlmva sweep")


def _serve_test_lvlm(args: argparse.Namespace) -> int:
    from .testing.openai_server import serve

    return serve(args, prog="lvlmva serve-test-lvlm")


def _export(args: argparse.Namespace) -> int:
    from .atomic import write_atomic
    from .export import ExportError, export

    try:
        text = export(args.path, args.format)
    except ExportError as exc:
        print(f"lvlmva: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.out is None:
        sys.stdout.write(text)
        return EXIT_OK
    try:
        write_atomic(args.out, text)
    except OSError as exc:
        print(f"lvlmva: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{args.format}: {args.out}", file=sys.stderr)
    return EXIT_OK


def _review(args: argparse.Namespace) -> int:
    from .pipeline.errors import ConfigurationError
    from .review.server import ReviewError, serve

    try:
        return serve(
            args.run_dir, branch=args.branch, host=args.host, port=args.port, read_only=args.read_only,
            reviewer=args.reviewer, open_browser=not args.no_browser,
        )
    except (ReviewError, ConfigurationError) as exc:
        print(f"lvlmva: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return EXIT_OK


def _plugins(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    registry = get_registry()
    table = Table(title="lvlmva plugins", show_lines=False)
    for column in ("role", "name", "distribution", "version", "summary"):
        table.add_column(column, overflow="fold")
    for role in [args.role] if args.role else list(ROLES):
        entries = list(registry.entries(role))
        if not entries:
            table.add_row(role, "-", "", "", "(none installed)")
        for entry in entries:
            table.add_row(role, entry.name, entry.distribution, entry.version, entry.summary)
    Console(width=160 if not sys.stdout.isatty() else None).print(table)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
