"""The pipeline behind ``lvlmva compose``.

- :mod:`.stage`: what a stage declares and what its run function receives;
- :mod:`.stages`: the built-in stages and how a run's list of stages is built;
- :mod:`.orchestrator`: planning, fingerprints and the loop (:class:`Pipeline`);
- :mod:`.rundir`: the run directory (claiming, locking, committing, integrity, publishing,
  reading a finished run with :func:`open_run`);
- :mod:`.codecs`: how artifacts are stored;
- :mod:`.sources`, :mod:`.fingerprints`: the code and the settings a fingerprint hashes;
- :mod:`.environment`: env.json and the process state a run restores;
- :mod:`.errors`: what can go wrong, as the CLI's exit codes see it.
"""

from __future__ import annotations

from .codecs import ArtifactError, ModelArtifact
from .environment import environment_info
from .errors import (
    ConfigurationError,
    NotARunDirectory,
    PublishError,
    RunDirectoryBusy,
    StageFailed,
)
from .orchestrator import (
    ARTIFACT_VERSION,
    Pipeline,
    StageOutcome,
    default_cache_dir,
)
from .rundir import FinishedRun, RunDirectory, open_run
from .stage import Stage, StageCall, StageIncomplete, StageView, UndeclaredAccess

__all__ = [
    "ARTIFACT_VERSION",
    "ArtifactError",
    "ConfigurationError",
    "FinishedRun",
    "ModelArtifact",
    "NotARunDirectory",
    "Pipeline",
    "PublishError",
    "RunDirectory",
    "RunDirectoryBusy",
    "Stage",
    "StageCall",
    "StageFailed",
    "StageIncomplete",
    "StageOutcome",
    "StageView",
    "UndeclaredAccess",
    "default_cache_dir",
    "environment_info",
    "open_run",
]
