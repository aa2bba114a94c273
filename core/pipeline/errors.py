"""What can go wrong in a run, as exceptions the CLI turns into exit codes (2: bad input, before
or without losing work; 1: a stage failed, the run directory is kept)."""

from __future__ import annotations

from pathlib import Path

from ..settings import SettingsError

__all__ = [
    "ConfigurationError",
    "NotARunDirectory",
    "RunDirectoryBusy",
    "StageFailed",
    "StageInputError",
    "PublishError",
    "describe_failure",
    "format_traceback",
]


class ConfigurationError(SettingsError):
    """Settings that validate one by one but do not fit together, or do not fit the data set
    (checked before any stage computes)."""


class NotARunDirectory(ConfigurationError):
    """An output folder that lvlmva did not create and that is not empty (or not a folder)."""


class RunDirectoryBusy(ConfigurationError):
    """Another process is running in the same run directory."""


class StageInputError(ConfigurationError):
    """A stage found a file of the user's that it reads unusable (``review/overrides.json``
    that is not JSON, or names samples the run does not have): the run stops with exit 2, the
    file is left as it is, and every stage finished so far is kept."""


class StageFailed(Exception):
    """One or more stages failed; every stage that finished is kept in the run directory, and
    stages that did not depend on a failed one were still computed."""

    def __init__(
        self, failures: dict[str, BaseException], run_dir: Path, error_files: dict[str, Path] | None = None
    ) -> None:
        self.failures = dict(failures)
        self.run_dir = run_dir
        #: stage -> the file holding its full traceback (``<run>/logs/<stage>.error.txt``)
        self.error_files = dict(error_files or {})
        self.stage, self.cause = next(iter(self.failures.items()))
        lines = [f"stage {name!r} failed: {describe_failure(exc)}" for name, exc in self.failures.items()]
        super().__init__("; ".join(lines) + f" (run directory kept: {run_dir})")


class PublishError(Exception):
    """results.json or the report could not be written into the run directory."""


def describe_failure(exc: BaseException) -> str:
    """How a stage's failure is written: an unfinished stage's or a settings or data problem's
    own sentence, else the exception's type and message; registered secrets redacted."""
    from ..secrets import redact
    from .stage import StageIncomplete

    if isinstance(exc, (StageIncomplete, SettingsError)):  # sentences of their own (a data problem)
        return redact(str(exc))
    return redact(f"{type(exc).__name__}: {exc}")


def format_traceback(exc: BaseException) -> str:
    """The full traceback of ``exc`` (with its causes), registered secrets redacted."""
    import traceback

    from ..secrets import redact

    return redact("".join(traceback.format_exception(exc)))
