"""Checkpoints inside long stages: a killed stage resumes where its last checkpoint left it.

A training loop (:meth:`lvlmva.training.Trainer.fit`,
:meth:`lvlmva.training.AlignmentTrainer.fit`) asks the run context's :class:`Checkpoints` for a
key when it starts (its tag and how many fits of that tag the stage started before it, so the
same computation asks for the same keys in the same order), loads the state saved under that
key if there is one, and after every epoch saves its whole state when :meth:`Checkpoints.due`
says so: the model's and the optimiser's state, the epoch, every random generator it draws from
and the state of its callbacks. Resumed, the loop continues from the saved epoch and ends with
the same weights, byte for byte, as a run that was never interrupted.

A checkpoint is due after epoch ``e`` when ``checkpoint_every`` > 0 divides ``e``, or when
``checkpoint_minutes`` have passed since the stage's last checkpoint (``[run]``). The files lie
in ``checkpoints/`` of the stage's unfinished folder (``.partial-<stage>/``), beside a copy of
the stage's fingerprint: the next computation of the stage keeps them only when its fingerprint
is the same (same settings, inputs and code), and they are deleted before the stage is
committed, so a finished stage holds none.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHECKPOINTS", "FINGERPRINT_FILE", "Checkpoints", "rng_state", "set_rng_state", "stateful"]

#: the folder of a stage's unfinished folder that holds its checkpoints
CHECKPOINTS = "checkpoints"
#: the fingerprint of the computation the checkpoints belong to, in that folder
FINGERPRINT_FILE = "FINGERPRINT"


def stateful(obj: Any) -> bool:
    """Whether ``obj`` (a callback, an objective, a draw function) can be saved and restored:
    it is None or has ``state_dict()`` and ``load_state_dict(state)``."""
    return obj is None or (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None)))


def rng_state(device: torch.device) -> dict[str, Any]:
    """torch's global CPU generator state (and the device's CUDA one on a GPU)."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


class Checkpoints:
    """The checkpoints of one computation of one stage (see the module docstring).

    ``every``: a checkpoint after every ``every``-th epoch (0: none by count); ``minutes``: one
    after any epoch that ends this long after the last (0: after every epoch; ``None``: none by
    time)."""

    def __init__(self, folder: Path, every: int = 0, minutes: float | None = 5.0) -> None:
        self.folder = Path(folder)
        self.every = every
        self.minutes = minutes
        self._started: dict[str, int] = {}
        self._last = time.monotonic()
        self.saved = 0
        self.resumed: list[str] = []

    def key(self, tag: str) -> str:
        """The key of the next fit tagged ``tag`` in this stage (``<tag>.<k>``, ``k`` counting
        the fits of that tag started before it)."""
        k = self._started.get(tag, 0)
        self._started[tag] = k + 1
        return f"{re.sub(r'[^A-Za-z0-9._=-]+', '_', tag)}.{k}"

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.pt"

    def load(self, key: str) -> dict[str, Any] | None:
        """The state saved under ``key``, or None. A file that cannot be read is reported on
        stderr and ignored (the fit starts over: slower, never different)."""
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - reported; starting over gives the same weights
            print(f"lvlmva: checkpoint {path} cannot be read ({exc}); that fit starts over", file=sys.stderr)
            return None
        self.resumed.append(key)
        return state

    def due(self, epoch: int) -> bool:
        """Whether a checkpoint is due after ``epoch`` (counted from 1)."""
        if self.every > 0 and epoch % self.every == 0:
            return True
        return self.minutes is not None and time.monotonic() - self._last >= self.minutes * 60

    def save(self, key: str, state: dict[str, Any]) -> None:
        """Write ``state`` under ``key`` atomically (a kill while writing leaves the previous
        checkpoint)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        self._last = time.monotonic()
        self.saved += 1
