"""What a run records about its process and what it puts back: versions, the git state and
the device for env.json; torch's global determinism switches and the global generators, saved
and restored around work that must leave them as it found them; each stage's seed."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ..results import machine_info

__all__ = ["GlobalTorchState", "isolated_rng", "stage_seed", "environment_info"]


class GlobalTorchState:
    """torch's process-wide determinism switches, restored after a run so that a run inside a
    larger program (a notebook, a test session) leaves them as it found them."""

    def __init__(self, enabled: bool, warn_only: bool, cudnn_benchmark: bool) -> None:
        self.enabled, self.warn_only, self.cudnn_benchmark = enabled, warn_only, cudnn_benchmark

    @classmethod
    def save(cls) -> GlobalTorchState:
        return cls(
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.benchmark,
        )

    def restore(self) -> None:
        torch.use_deterministic_algorithms(self.enabled, warn_only=self.warn_only)
        torch.backends.cudnn.benchmark = self.cudnn_benchmark


class isolated_rng:
    """Save and restore torch's, numpy's and random's global generators."""

    def __enter__(self) -> None:
        import random

        import numpy as np

        self._states = (torch.get_rng_state(), np.random.get_state(), random.getstate())

    def __exit__(self, *exc: object) -> None:
        import random

        import numpy as np

        torch.set_rng_state(self._states[0])
        np.random.set_state(self._states[1])
        random.setstate(self._states[2])


def stage_seed(seed: int, stage: str) -> int:
    digest = hashlib.sha256(f"{seed}:{stage}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def environment_info(device: torch.device, code: dict[str, Any] | None = None) -> dict[str, Any]:
    """Versions, git revision and device, for env.json; ``code``: which plugins and stages
    were fingerprinted by their source (:meth:`CodeFingerprints.record`)."""
    from importlib import metadata

    versions = {}
    for dist in ("lvlmva", "torch", "torchvision", "captum", "numpy", "scikit-learn", "scipy", "openai", "transformers", "pydantic", "pydantic-settings", "pluggy", "medmnist"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        **machine_info(device),
        "packages": versions,
        "cuda": torch.version.cuda,
        "git_revision": None,
        "argv": sys.argv,
    }
    if code is not None:
        info["code_fingerprints"] = code
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False,
            cwd=Path(__file__).resolve().parent,
        )
        if rev.returncode == 0:
            info["git_revision"] = rev.stdout.strip()
            status = subprocess.run(
                ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                timeout=5, check=False, cwd=Path(__file__).resolve().parent,
            )
            if status.returncode == 0:
                info["git_local_changes"] = bool(status.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass  # no git: the revision stays None
    return info
