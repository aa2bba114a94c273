"""Studies: seeds x methods from one or more settings files (``lvlmva study``).

A study is a grid of *cells*, one per (settings file, seed). A cell is an ordinary run directory
(``<study>/cells/<data set>/seed<N>``) in which one pipeline run computes every method the file
configures: the original model, the aligned one, the true-mask reference, each
``[mitigators.<name>]``. So the stages the methods share (training the original model,
attribution, the critic, ...) are computed once per seed, and a stopped study resumes cell by
cell and stage by stage: a cell whose stages are all stored is not run again.

Cells run serially, in N local worker processes, as Ray tasks, or as one SLURM job array
through submitit (a job per cell; submitit's local executor tries that on one machine). A worker gets the settings
*text*, the overrides and the cell's path, never Python objects, and sets torch to the study's
thread count, so a cell gives the same results.json whichever executor ran it. A failed cell
is recorded with its reason and its traceback (``<study>/logs/<cell>.error.txt``), and the
others go on; a local worker process that dies (killed for memory, a crash) fails the cell it was
running, and new workers run the cells left. The tables, statistics and plots of
:mod:`lvlmva.study.outputs` are written from every cell that published results.

A cell's results.json is trusted as its stages are: the SHA-256 of the file each cell's run
published is recorded in the study's ``cells.jsonl``, and the file is checked against it before
its numbers are used. A cell whose results.json was changed or cannot be read is computed again
(its stages, intact, are reused), never read into the tables.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic import write_atomic
from ..secrets import redact
from ..settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from ..options import StudyOptions
    from ..pipeline import Pipeline
    from .outputs import ComparisonFamily

__all__ = ["Cell", "StudyPlan", "plan_study", "run_study", "run_cell", "CELL_SETTINGS"]

#: the settings text of a cell, kept in its run directory (what the worker loads)
CELL_SETTINGS = "cell.settings.toml"
#: the study's record of its cells: one JSON line per finished cell run, the last one counts
CELL_LOG = "cells.jsonl"


@dataclass(frozen=True)
class Cell:
    """One (data set, seed) of a study: what a worker needs, as plain data."""

    dataset: str
    seed: int
    settings_text: str
    settings_name: str
    overrides: tuple[str, ...]
    run_dir: str
    threads: int

    @property
    def label(self) -> str:
        return f"{self.dataset} seed {self.seed}"

    @property
    def key(self) -> str:
        """The cell's name in file names (``logs/<key>.error.txt``)."""
        return f"{self.dataset}-seed{self.seed}"


@dataclass(frozen=True)
class StudyPlan:
    """The cells of a study and where it writes."""

    directory: Path
    settings: Settings
    cells: tuple[Cell, ...]
    datasets: tuple[str, ...]
    #: per cell: every stage stored and intact for the settings as they are now, results published
    #: and equal to what the cell's last run published (its SHA-256 in cells.jsonl)
    finished: tuple[bool, ...] = ()
    #: per cell: why its published results.json is not used and the cell runs again ("" if none)
    unverified: tuple[str, ...] = ()
    #: per cell: its last line in cells.jsonl (``None`` for a cell never run in this study)
    records: tuple[dict[str, Any] | None, ...] = ()
    #: the families of comparisons of ``[study] compare`` and ``comparisons``, pairs by data set
    families: tuple[ComparisonFamily, ...] = ()


def _dataset_label(path: Path, settings: Settings, taken: set[str]) -> str:
    label = settings.run.name or path.stem
    base, n = label, 2
    while label in taken:
        label, n = f"{base}_{n}", n + 1
    taken.add(label)
    return label


def read_cell_log(directory: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """(data set, seed) -> the last record of that cell in ``<study>/cells.jsonl``. A line cut by
    a kill is skipped."""
    try:
        text = (Path(directory) / CELL_LOG).read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    records: dict[tuple[str, int], dict[str, Any]] = {}
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("dataset"), str) and type(record.get("seed")) is int:
            records[(record["dataset"], record["seed"])] = record
    return records


def _check_published(results_path: Path, record: dict[str, Any] | None) -> str:
    """What is wrong with a cell's stored ``results_path``, naming the file; "" when it is the
    file the cell's last run published (the SHA-256 in cells.jsonl)."""
    from ..pipeline.rundir import sha256_file

    if record is not None and record.get("published") is False:
        return f"{results_path} is older than the cell's last run, which failed before publishing"
    expected = (record or {}).get("results_sha256")
    if not isinstance(expected, str):
        return f"{results_path} has no SHA-256 in the study's {CELL_LOG}"
    try:
        actual = sha256_file(results_path)
    except OSError as exc:
        return f"{results_path} cannot be read ({exc.strerror or exc})"
    if actual != expected:
        return f"{results_path} was changed after the cell finished (SHA-256 differs)"
    return ""


def _read_verified(results_path: Path, expected: Any) -> tuple[dict[str, Any] | None, str]:
    """The parsed results.json when its bytes have the SHA-256 ``expected``; else ``None`` and
    what is wrong. The bytes hashed are the bytes parsed."""
    if not isinstance(expected, str):
        return None, f"{results_path} has no SHA-256 in the study's {CELL_LOG}"
    try:
        data = results_path.read_bytes()
    except OSError as exc:
        return None, f"{results_path} cannot be read ({exc.strerror or exc})"
    if hashlib.sha256(data).hexdigest() != expected:
        return None, f"{results_path} was changed after the cell finished (SHA-256 differs)"
    try:
        results = json.loads(data)
    except ValueError as exc:
        return None, f"{results_path} is not valid JSON ({exc})"
    if not isinstance(results, dict):
        return None, f"{results_path} holds no JSON object"
    return results, ""


def study_models(pipeline: Pipeline) -> dict[str, str]:
    """Model key -> label of every model a run of ``pipeline``'s settings produces, in the
    run's order (the methods of a study); models of stages these settings skip are not."""
    return {
        s.model: s.label or s.model
        for s in pipeline.stages
        if s.model is not None and pipeline.skipped[s.name] is None
    }


def aligned_parts(settings: Settings, models: Sequence[str]) -> dict[str, dict[str, str | None]]:
    """Aligned model key -> the slots it comes from: ``aligner`` (``"aligners.rrr"``),
    ``segmenter`` and ``critic`` (``"segmenters.j5"``, ``"critics.oracle"``; both ``None`` for a
    model aligned on true masks), for the aligned models among ``models``. Read from the
    settings, as the pipeline names its models (``aligned`` and the instance names of the
    aligner, the segmenter and the critic given as named instances), never by splitting a key at
    its dots: ``aligned.a.b`` may be aligner a with critic b or segmenter a with critic b."""
    from ..pipeline.stages import aligned_models

    parts: dict[str, dict[str, str | None]] = {}
    for key, aligner, branch in aligned_models(settings):
        if key in models:
            parts[key] = {
                "aligner": aligner.slot,
                "segmenter": branch.segmenter.slot if branch is not None else None,
                "critic": branch.critic.slot if branch is not None else None,
            }
    unread = [m for m in models if m.split(".")[0] == "aligned" and m not in parts]
    if unread:  # the pipeline named a model in a way this function does not know
        raise RuntimeError(f"cannot tell the aligner, segmenter and critic of model(s) {', '.join(unread)}")
    return {m: parts[m] for m in models if m in parts}


def _comparison_pairs(path: Path, settings: Settings, models: dict[str, str]) -> dict[str, list[tuple[str, str]]]:
    """Family name -> its pairs for one settings file, in the order of ``[study] compare`` then
    ``comparisons``; the baseline, every listed key and every family checked against the
    models the settings produce (:class:`SettingsError` naming them otherwise)."""
    from .outputs import FAMILY_ROLES, pairs_differing_in

    study = settings.study
    produced = ", ".join(models)
    if study.baseline not in models:
        raise SettingsError(f"{path}: study.baseline = {study.baseline!r} is not a model of the study ({produced})")
    for pair in study.comparisons:
        for key in pair:
            if key not in models:
                raise SettingsError(
                    f"{path}: study.comparisons names {key!r}, which is not a model these settings produce; "
                    f"their models: {produced}"
                )
    parts = aligned_parts(settings, list(models))
    families: dict[str, list[tuple[str, str]]] = {}
    for name in study.compare:
        role = FAMILY_ROLES[name]
        pairs = pairs_differing_in(parts, role)
        if not pairs:
            slots = sorted({p[role] for p in parts.values() if p[role] is not None})
            raise SettingsError(
                f"{path}: study.compare {name!r} finds no two aligned models that differ in their {role} only "
                f"(aligned models: {', '.join(parts) or 'none'}; {role}s: {', '.join(slots) or 'none'})"
            )
        families[name] = pairs
    if study.comparisons:
        families["comparisons"] = [tuple(p) for p in study.comparisons]  # type: ignore[misc]
    return families


def plan_study(settings_files: Sequence[Path], overrides: Sequence[str] = (), out: Path | None = None) -> StudyPlan:
    """Read and check every settings file and every cell before anything runs: a bad value,
    a combination that cannot work, an output folder that is not ours, a missing API key all
    stop the study with :class:`SettingsError` (exit 2)."""
    from ..pipeline import Pipeline, RunDirectory
    from .outputs import FAMILY_DESCRIPTIONS, ComparisonFamily

    if not settings_files:
        raise SettingsError("a study needs at least one settings file")
    first = load_settings(settings_files[0], overrides)
    study = first.study
    directory = Path(out) if out is not None else Path(study.out_dir) / (study.name or f"{Path(settings_files[0]).stem}_study")
    RunDirectory.check(directory, kind="study")
    log = read_cell_log(directory)
    cells: list[Cell] = []
    finished: list[bool] = []
    unverified: list[str] = []
    records: list[dict[str, Any] | None] = []
    datasets: list[str] = []
    taken: set[str] = set()
    family_pairs: dict[str, dict[str, list[tuple[str, str]]]] = {}
    for path in settings_files:
        path = Path(path)
        base = load_settings(path, overrides)
        if path != Path(settings_files[0]) and base.section("study") and base.study != study:
            # one study, one schedule: a later file's [study] would otherwise be ignored
            mine, theirs = base.study.model_dump(), study.model_dump()
            keys = ", ".join(f"{k} ({theirs[k]!r} there, {mine[k]!r} here)" for k in mine if mine[k] != theirs[k])
            raise SettingsError(
                f"{path}: its [study] differs from that of {settings_files[0]}: {keys}. The study follows "
                "one [study] section: make them equal, or leave [study] out of all files but the first"
            )
        if not base.instances("evaluator"):
            raise SettingsError(f"{path}: a study compares evaluations: configure [evaluators.<name>]")
        if study.evaluator is not None and study.evaluator not in base.instances("evaluator"):
            raise SettingsError(
                f"{path}: study.evaluator = {study.evaluator!r} is not one of its evaluators "
                f"({', '.join(base.instances('evaluator'))})"
            )
        label = _dataset_label(path, base, taken)
        datasets.append(label)
        text = path.read_text(encoding="utf-8")
        for seed in study.seeds:
            run_dir = directory / "cells" / label / f"seed{seed}"
            cell_overrides = (*overrides, f"run.seed={seed}")
            settings = load_settings(path, cell_overrides)
            RunDirectory.check(run_dir)
            # combinations and preflight (keys, budgets); its plan, made with the settings as
            # they are now (an edited file is not finished), says whether the cell is finished
            pipeline = Pipeline(settings, run_dir, echo=lambda _m: None)
            if seed == study.seeds[0]:  # the models, and so the comparisons, are the seeds'
                for name, pairs in _comparison_pairs(path, settings, study_models(pipeline)).items():
                    family_pairs.setdefault(name, {})[label] = pairs
            published = (run_dir / "results.json").is_file() and (run_dir / CELL_SETTINGS).is_file()
            stored = published and all(o.status in ("reused", "skipped") for o in pipeline.plan())
            # a stored cell is finished only with the results.json its last run published
            record = log.get((label, seed))
            problem = _check_published(run_dir / "results.json", record) if stored else ""
            finished.append(stored and not problem)
            unverified.append(problem)
            records.append(record)
            cells.append(Cell(label, seed, text, path.name, cell_overrides, str(run_dir), study.threads))
    families = tuple(
        ComparisonFamily(name, FAMILY_DESCRIPTIONS.get(name, "the pairs listed in [study] comparisons"), pairs)
        for name, pairs in family_pairs.items()
    )
    return StudyPlan(directory, first, tuple(cells), tuple(datasets), tuple(finished), tuple(unverified), tuple(records), families)


def run_cell(cell: Cell | dict[str, Any]) -> dict[str, Any]:
    """Run one cell (in this process: the local executor's workers and Ray tasks call this) and
    return its status as plain data. Never raises for a failing run: the reason is returned."""
    import torch

    if isinstance(cell, dict):
        cell = Cell(**{**cell, "overrides": tuple(cell["overrides"])})
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cell.threads)
    try:
        return _run_cell(cell)
    finally:  # the serial executor runs cells in the caller's process
        torch.set_num_threads(threads_before)


def _run_cell(cell: Cell) -> dict[str, Any]:
    from ..pipeline import Pipeline, RunDirectory, StageFailed
    from ..pipeline.errors import describe_failure

    run_dir = Path(cell.run_dir)
    started = time.perf_counter()
    out: dict[str, Any] = {"dataset": cell.dataset, "seed": cell.seed, "run_dir": cell.run_dir}
    try:
        rundir = RunDirectory.claim(run_dir)
        settings_path = rundir.path / CELL_SETTINGS
        write_atomic(settings_path, cell.settings_text)
        settings = load_settings(settings_path, cell.overrides)
        pipeline = Pipeline(settings, run_dir, echo=lambda _m: None)
        try:
            pipeline.run()
            out.update(status="ok", reason="", published=True)
        except StageFailed as exc:  # raised after results.json was published with the failure
            reasons = "; ".join(f"{name}: {describe_failure(e)}" for name, e in exc.failures.items())
            out.update(status="failed", reason=redact(reasons), published=True, traceback=_format_traceback(exc))
            # the run's own traceback files, one per failed stage (lvlmva.pipeline writes them)
            out["stage_error_files"] = {str(k): str(v) for k, v in getattr(exc, "error_files", {}).items()}
        out["results_sha256"] = _published_digest(run_dir / "results.json")
        counts = {}
        for outcome in pipeline.outcomes.values():
            counts[outcome.status] = counts.get(outcome.status, 0) + 1
        out["stages"] = counts
        stored = {s.name for s in pipeline.stages if s.persist}  # the data set is loaded, not stored
        out["computed"] = sorted(n for n, o in pipeline.outcomes.items() if o.status == "computed" and n in stored)
    except Exception as exc:  # a cell that cannot even start: recorded, the study goes on
        out.update(status="failed", reason=describe_failure(exc), published=False,
                   traceback=_format_traceback(exc))  # fmt: skip
        out.pop("results_sha256", None)
    out["seconds"] = round(time.perf_counter() - started, 3)
    return out


def _published_digest(results_path: Path) -> str:
    """The SHA-256 of the results.json a cell's run just published, recorded so that the study
    uses that file and no other; a file that is not a JSON object is a failure of the cell."""
    data = results_path.read_bytes()
    try:
        if not isinstance(json.loads(data), dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise ValueError(f"the run published a results.json that cannot be read: {results_path}: {exc}") from None
    return hashlib.sha256(data).hexdigest()


def _format_traceback(exc: BaseException) -> str:
    """The full traceback of a cell's failure, formatted where it happened (in the worker: an
    exception may not pickle), with registered secrets redacted there (a plugin registers its
    key in the worker's process). A failed run's StageFailed is followed by each failed
    stage's own traceback."""
    from ..pipeline import StageFailed
    from ..pipeline.errors import format_traceback

    parts = [format_traceback(exc)]
    if isinstance(exc, StageFailed):
        for name, failure in exc.failures.items():
            parts.append(f"\nstage {name!r} failed:\n" + format_traceback(failure))
    return "".join(parts)


Done = Callable[[Cell, dict[str, Any]], None]


def _run_serial(cells: Sequence[Cell], done: Done, echo: Callable[[str], None]) -> None:
    for cell in cells:
        echo(f"  running {cell.label} ...")
        done(cell, run_cell(cell))


def _failed_status(cell: Cell, reason: str) -> dict[str, Any]:
    return {"dataset": cell.dataset, "seed": cell.seed, "run_dir": cell.run_dir, "status": "failed",
            "reason": reason, "seconds": 0.0, "published": False}  # fmt: skip


#: in a local worker process: where it announces the cell it starts (pid, data set, seed)
_STARTED: Any = None


def _worker_init(started: Any) -> None:
    global _STARTED
    _STARTED = started


def _worker_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """A local worker's task: says which cell this process runs (so that a worker that dies
    fails its own cell only), then runs it."""
    _STARTED.put((os.getpid(), cell["dataset"], cell["seed"]))
    return run_cell(cell)


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is None:
        return "its exit status is not known"
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def _read_started(started: Any, running: dict[int, tuple[str, int]]) -> None:
    """Worker pid -> the (data set, seed) it started last, from the workers' announcements."""
    while not started.empty():
        pid, dataset, seed = started.get()
        running[pid] = (dataset, seed)


class _FirstToEnd:
    """Waits on a pool's worker processes and keeps the one(s) that ended first. When a worker
    dies, the pool stops all the others (SIGTERM) at once: only the first to end is the worker
    that died, whatever its exit status."""

    def __init__(self, processes: dict[int, Any]) -> None:
        import multiprocessing
        import threading

        self.sentinels = {p.sentinel: pid for pid, p in processes.items()}
        self.first: list[int] = []
        self._stop_reader, self._stop_writer = multiprocessing.Pipe(duplex=False)
        self._thread = threading.Thread(target=self._wait, name="lvlmva-study-workers", daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        from multiprocessing.connection import wait

        ready = wait([*self.sentinels, self._stop_reader])
        self.first = [self.sentinels[s] for s in ready if s in self.sentinels]

    def stop(self) -> list[int]:
        self._stop_writer.send(None)
        self._thread.join()
        self._stop_reader.close()
        self._stop_writer.close()
        return self.first


def _run_processes(cells: Sequence[Cell], done: Done, workers: int, echo: Callable[[str], None]) -> None:
    import multiprocessing
    import threading
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    # The pool writes to its workers' pipes while it stops them (after a worker died, or Ctrl-C)
    # and expects EPIPE there; the command line restores SIGPIPE's default (a quiet `| head`),
    # which would make such a write end the study. Ignored while the pool may write; after
    # Ctrl-C it stays ignored, since the pool's threads run until the process exits.
    ignore_sigpipe = hasattr(signal, "SIGPIPE") and threading.current_thread() is threading.main_thread()
    if ignore_sigpipe:
        sigpipe = signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    # spawn: a fresh interpreter per worker, as on a cluster (no state inherited by fork)
    context = multiprocessing.get_context("spawn")
    todo = list(cells)
    fruitless = 0  # pools in a row that broke before any cell ended in them
    while todo:
        started = context.SimpleQueue()
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init, initargs=(started,))
        running: dict[int, tuple[str, int]] = {}  # worker pid -> the cell it started last
        try:
            futures = {pool.submit(_worker_cell, asdict(c)): c for c in todo}
            # every worker is started by now (spawned on submit); their Process objects stay
            # readable after the pool forgets them
            processes = dict(pool._processes or {})
            watch = _FirstToEnd(processes)
            left: list[Cell] = []
            ended = 0
            for future in as_completed(futures):
                cell = futures[future]
                _read_started(started, running)
                try:
                    status = future.result()
                except BrokenProcessPool:
                    left.append(cell)  # sorted out below, once every worker has stopped
                    continue
                except Exception as exc:  # the result could not be returned (it did not pickle)
                    status = _failed_status(cell, redact(f"worker process failed: {type(exc).__name__}: {exc}"))
                ended += 1
                done(cell, status)
        except BaseException:
            # Ctrl-C (or an error here): stop now instead of waiting for every queued cell. The
            # cells running are stopped too; each keeps its finished stages, and the stage it was
            # computing is discarded (never committed half-written), so a re-run resumes there.
            workers_now = list((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for process in workers_now:
                process.terminate()
            for process in workers_now:
                process.join(timeout=10)
            raise
        pool.shutdown()  # after a break: waits for the workers the pool stopped
        first = watch.stop()
        _read_started(started, running)
        started.close()
        if not left:
            break
        # The worker that died is the first to end; the others were stopped by the pool
        # (SIGTERM), and should two have ended together, one that did not end by SIGTERM died.
        codes = {pid: processes[pid].exitcode for pid in first}
        died = [pid for pid in first if codes[pid] != -signal.SIGTERM] or first
        by_key = {(c.dataset, c.seed): c for c in left}
        lost = {by_key[running[pid]]: codes[pid] for pid in died if running.get(pid) in by_key}
        for cell, code in lost.items():
            ended += 1
            done(cell, _failed_status(cell, f"the worker process running the cell died ({_how_it_ended(code)})"))
        todo = [c for c in left if c not in lost]
        fruitless = 0 if ended else fruitless + 1
        how = ", ".join(_how_it_ended(processes[pid].exitcode) for pid in died) or "its exit status is not known"
        if fruitless >= 2:  # workers that die before running anything: do not start them forever
            for cell in todo:
                done(cell, _failed_status(cell, f"the study's worker processes died before they ran the cell ({how})"))
            break
        if todo:
            echo(f"  a worker process died ({how}); new worker processes run the {len(todo)} cells left")
    if ignore_sigpipe and sigpipe is not None:  # None: set outside Python, cannot be restored
        signal.signal(signal.SIGPIPE, sigpipe)


def _run_ray(cells: Sequence[Cell], done: Done, address: str | None, threads: int) -> None:
    try:
        import ray
    except ImportError:
        raise SettingsError('study.executor = "ray" needs Ray: pip install "lvlmva[ray]"') from None
    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
    try:
        task = ray.remote(num_cpus=threads)(run_cell)
        pending = {task.remote(asdict(c)): c for c in cells}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    cell = pending.pop(ref)
                    try:
                        status = ray.get(ref)
                    except Exception as exc:  # the task's worker died (memory, a crash): recorded
                        status = {"dataset": cell.dataset, "seed": cell.seed, "run_dir": cell.run_dir, "status": "failed",
                                  "reason": f"Ray task failed: {type(exc).__name__}: {exc}", "seconds": 0.0, "published": False}  # fmt: skip
                    done(cell, status)
        except BaseException:
            for ref in pending:  # Ctrl-C: queued and running cells are cancelled, not awaited
                ray.cancel(ref, force=True)
            raise
    finally:
        if started_here:
            ray.shutdown()


#: what a missing submitit says (``lvlmva study`` exits 2 with it)
NO_SUBMITIT = 'study.executor = "slurm" needs submitit: pip install "lvlmva[slurm]"'


def _import_submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise SettingsError(NO_SUBMITIT) from None
    return submitit


def slurm_logs_folder(study: StudyOptions, directory: Path) -> Path:
    """Where submitit keeps each job's pickled cell, result, stdout and stderr."""
    return Path(study.slurm_logs) if study.slurm_logs is not None else Path(directory) / "logs" / "submitit"


def submitit_parameters(study: StudyOptions, directory: Path) -> dict[str, Any]:
    """The keyword arguments of ``submitit.AutoExecutor.update_parameters`` for a study's cells:
    one node, one task and ``slurm_cpus`` (else ``threads``) CPUs per cell, and the study's
    partition, time limit, GPUs, memory, account, QoS, array parallelism and extra sbatch
    options. ``None`` leaves a value to the cluster's default (submitit drops it)."""
    return {
        "name": f"lvlmva-{Path(directory).name}",
        "timeout_min": study.slurm_time_min,
        "nodes": 1,
        "tasks_per_node": 1,
        "cpus_per_task": study.slurm_cpus if study.slurm_cpus is not None else study.threads,
        "gpus_per_node": study.slurm_gpus or None,  # no --gpus-per-node=0 (a GPU-less cluster refuses it)
        "mem_gb": study.slurm_mem_gb,
        "slurm_partition": study.slurm_partition,
        "slurm_account": study.slurm_account,
        "slurm_qos": study.slurm_qos,
        "slurm_array_parallelism": study.slurm_array_parallelism,
        # "" is a flag without a value (exclusive = "" -> --exclusive): submitit writes True so
        "slurm_additional_parameters": {k: True if v == "" else v for k, v in study.slurm_parameters.items()} or None,
        "slurm_setup": list(study.slurm_setup) or None,
    }


def submitit_executor(study: StudyOptions, directory: Path) -> Any:
    """submitit's executor for ``[study] slurm_cluster``, its parameters set; a cluster that
    cannot be used (no ``srun`` on PATH, a parameter submitit refuses) is a
    :class:`SettingsError`."""
    submitit = _import_submitit()
    folder = slurm_logs_folder(study, directory)
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=study.slurm_cluster)
    except RuntimeError as exc:  # SlurmExecutor: 'Could not detect "srun", are you indeed on a slurm cluster?'
        raise SettingsError(
            f'study.slurm_cluster = "{study.slurm_cluster}" cannot submit from this machine ({exc}); '
            'slurm_cluster = "local" tries the study\'s settings on this machine without a cluster'
        ) from None
    try:
        executor.update_parameters(**submitit_parameters(study, directory))
    except (AssertionError, NameError, ValueError, TypeError) as exc:
        raise SettingsError(f"submitit refuses the study's slurm_* settings: {exc}") from None
    return executor


def _submitit_summary(text: str) -> str:
    """One line from submitit's text of a job without a result: its head ("Job 12_0 (task: 0)
    with path ... has not produced any output (state: TIMEOUT)"), and the exception's line where
    the text holds the job's traceback."""
    blocks = re.split(r"\n-{8,}\n", text)
    head = " ".join(line.strip() for line in blocks[0].splitlines() if line.strip())
    if len(blocks) > 1 and blocks[1].lstrip().startswith("Traceback"):
        lines = [line.strip() for line in blocks[1].splitlines() if line.strip()]
        head = f"{head} {lines[-1]}"
    return head if len(head) <= 400 else head[:399] + "…"


def _job_failure(cell: Cell, job: Any, exc: BaseException) -> dict[str, Any]:
    """A cell whose job returned no status (it was killed: time or memory limit, a crash; it
    raised past run_cell): failed, with submitit's first line as the reason and its whole
    text, which holds the job's traceback or its error stream, as the traceback file."""
    text = redact(str(exc).strip()) or type(exc).__name__
    first = _submitit_summary(text)
    stderr = getattr(getattr(job, "paths", None), "stderr", None)
    where = f" (log: {str(stderr).replace('%t', '0')})" if stderr is not None else ""
    status = _failed_status(cell, f"job {job.job_id} ended without the cell's status: {type(exc).__name__}: {first}{where}")
    status["traceback"] = f"job {job.job_id} of submitit, state {getattr(job, 'state', 'unknown')}:\n{text}\n"
    return status


def _run_submitit(cells: Sequence[Cell], done: Done, executor: Any, study: StudyOptions, directory: Path, echo: Callable[[str], None]) -> None:
    """The cells as one job array of ``executor`` (:func:`submitit_executor`); each job runs
    :func:`run_cell` as the other executors do, and ``done`` gets each status as its job ends."""
    if not cells:
        return
    jobs = executor.map_array(run_cell, [asdict(c) for c in cells])
    pending = dict(zip(jobs, cells, strict=True))
    arrays = sorted({job.job_id.split("_")[0] for job in jobs if "_" in job.job_id})  # SLURM: <array>_<index>
    what = f"job array {', '.join(arrays)}" if arrays else f"job{'s' * (len(jobs) > 1)} {', '.join(j.job_id for j in jobs)}"
    echo(f"  submitted {len(jobs)} cells to {study.slurm_cluster} as {what}; submitit's logs: {slurm_logs_folder(study, directory)}")
    # the local executor's process exits at once, SLURM's states are read by submitit's watcher
    # (one sacct for all jobs, cached): polling them is cheap; a result is read once per job
    poll = 10.0 if study.slurm_cluster == "slurm" else 0.2
    try:
        while pending:
            ended = [job for job in pending if job.done()]
            for job in ended:
                cell = pending.pop(job)
                try:
                    status = job.result()
                except Exception as exc:  # no result: the job died or raised past run_cell
                    status = _job_failure(cell, job, exc)
                done(cell, status)
            if pending and not ended:
                time.sleep(poll)
    except BaseException:
        for job in pending:  # Ctrl-C: queued and running cells are cancelled, not awaited
            try:
                job.cancel(check=False)
            except Exception:  # noqa: S110 - a job that ended meanwhile, scancel missing: nothing to stop
                pass
        raise


def run_study(
    settings_files: Sequence[Path],
    overrides: Sequence[str] = (),
    out: Path | None = None,
    echo: Callable[[str], None] = print,
    debug: bool = False,
) -> dict[str, Any]:
    """Plan, run the cells that are not finished, and write the study's outputs; returns the
    summary (paths, cell statuses). Raises :class:`SettingsError` before any work on bad input.

    A failed cell's traceback is written to ``<study>/logs/<cell>.error.txt`` (secrets
    redacted); with ``debug`` it is echoed too."""
    from ..pipeline import RunDirectory
    from .outputs import CellResult, write_study_outputs

    plan = plan_study(settings_files, overrides, out)
    study = plan.settings.study
    if study.executor == "slurm":  # before the study directory is made: exit 2, nothing written
        _import_submitit()
    RunDirectory.claim(plan.directory, kind="study")
    log = plan.directory / CELL_LOG
    todo = [c for c, done in zip(plan.cells, plan.finished, strict=True) if not done]
    # made in the claimed directory (submitit makes its folder), before any cell: a cluster it
    # cannot submit to stops the study here (exit 2)
    executor = submitit_executor(study, plan.directory) if study.executor == "slurm" and todo else None
    total = len(plan.cells)
    echo(f"study {plan.directory}: {total} cells ({len(plan.datasets)} data sets x {len(study.seeds)} seeds), "
         f"{total - len(todo)} finished, {len(todo)} to run ({study.executor}"
         f"{f', {study.workers} workers' if study.executor == 'local' and study.workers > 1 else ''}"
         f"{f' through submitit, {study.slurm_cluster}' if study.executor == 'slurm' else ''})")  # fmt: skip
    for cell, problem in zip(plan.cells, plan.unverified, strict=True):
        if problem:
            echo(f"  {cell.label}: {problem}: computing the cell again")
    finished = total - len(todo)
    statuses: dict[tuple[str, int], dict[str, Any]] = {}

    def done(cell: Cell, status: dict[str, Any]) -> None:
        nonlocal finished
        finished += 1
        status = dict(status)
        error_file = plan.directory / "logs" / f"{cell.key}.error.txt"
        text = status.pop("traceback", None)
        if text is not None:
            write_atomic(error_file, redact(text))  # the worker redacted; so does this process
            status["error_file"] = str(error_file)
        else:  # the cell's last run decides: an earlier failure's traceback is not left behind
            error_file.unlink(missing_ok=True)
        status["reason"] = redact(status.get("reason", ""))
        statuses[(cell.dataset, cell.seed)] = status
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(status, sort_keys=True) + "\n")
        stages = status.get("stages", {})
        what = f"{stages.get('computed', 0)} stages computed, {stages.get('reused', 0)} reused"
        note = "" if status["status"] == "ok" else f": {status['reason']}"
        files = [f"traceback: {status['error_file']}"] if "error_file" in status else []
        files += [f"stage {stage}: {path}" for stage, path in status.get("stage_error_files", {}).items()]
        if files:
            note += f" ({'; '.join(files)})"
        echo(f"  [{finished}/{total}] {cell.label}: {status['status']} in {status['seconds']:.1f} s ({what}){note}")
        if debug and text is not None:
            echo(redact(text).rstrip("\n"))

    if study.executor == "ray":
        _run_ray(todo, done, study.address, study.threads)
    elif study.executor == "slurm":
        _run_submitit(todo, done, executor, study, plan.directory, echo)
    elif study.workers > 1:
        _run_processes(todo, done, study.workers, echo)
    else:
        _run_serial(todo, done, echo)

    cells = []
    for cell, record in zip(plan.cells, plan.records, strict=True):
        key = (cell.dataset, cell.seed)
        # a finished cell: the results.json its last run published, as cells.jsonl records it
        status = statuses.get(key) or {"status": "ok", "reason": "", "published": True, "seconds": (record or {}).get("seconds"),
                                       "results_sha256": (record or {}).get("results_sha256")}  # fmt: skip
        results_path = Path(cell.run_dir) / "results.json"
        results, problem = None, ""
        # a cell that failed before publishing may still hold an earlier run's results.json:
        # those numbers are not this study's and are not counted
        if status.get("published", True):
            results, problem = _read_verified(results_path, status.get("results_sha256"))
            if problem:  # changed while the study ran: not used, and said so
                echo(f"  {cell.label}: {problem}: its numbers are not used")
        # A cell whose run published results counts, also when one of its methods failed:
        # results.json names that method's failure and the others' numbers are valid.
        cells.append(
            CellResult(
                dataset=cell.dataset,
                seed=cell.seed,
                status="ok" if results is not None else "failed",
                results=results,
                reason=status.get("reason") or problem or ("" if results is not None else "no results.json"),
                seconds=status.get("seconds"),
                run_dir=cell.run_dir,
            )
        )
        statuses[key] = status
    summary = write_study_outputs(
        cells, plan.directory, metrics=tuple(study.metrics), evaluator=study.evaluator,
        baseline=study.baseline, alpha=study.alpha, correction=study.correction, families=plan.families,
        echo=echo,
    )  # fmt: skip
    failed = [c for c in cells if c.status != "ok" or c.reason]
    write_atomic(plan.directory / "study.json", json.dumps({
        "settings_files": [str(p) for p in settings_files], "overrides": list(overrides),
        "cells": [{"dataset": c.dataset, "seed": c.seed, "status": c.status, "reason": c.reason, "run_dir": c.run_dir,
                   **{k: statuses[(c.dataset, c.seed)][k] for k in ("results_sha256", "error_file", "stage_error_files")
                      if k in statuses[(c.dataset, c.seed)]}} for c in cells],
    }, indent=2) + "\n")  # fmt: skip
    return {**summary, "directory": str(plan.directory), "failed": len(failed), "cells": len(cells)}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lvlmva.study.runner SETTINGS...`` (the same as ``lvlmva study``)."""
    from ..cli import main as cli_main

    return cli_main(["study", *(sys.argv[1:] if argv is None else argv)])
