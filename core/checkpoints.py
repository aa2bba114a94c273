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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHECKPOINTS",
    "EVENTS",
    "FINGERPRINT_FILE",
    "Checkpoints",
    "FitCheckpoint",
    "rng_state",
    "set_rng_state",
    "stateful",
]

#: the folder of a stage's unfinished folder that holds its checkpoints
CHECKPOINTS = "checkpoints"
#: the fingerprint of the computation the checkpoints belong to, in that folder
FINGERPRINT_FILE = "FINGERPRINT"
#: the run directory's log of resumed fits, unreadable checkpoints and fits that take none
EVENTS = "checkpoints.jsonl"


def stateful(obj: Any) -> bool:
    """Whether ``obj`` (a callback, an objective, a draw function) can be saved and restored:
    it is None, or has ``state_dict()`` and ``load_state_dict(state)`` and does not say
    otherwise with a false ``can_checkpoint`` (a container of parts whose state is its parts',
    such as ``ChainedCallbacks`` holding one that has none)."""
    if obj is None:
        return True
    methods = callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))
    return methods and bool(getattr(obj, "can_checkpoint", True))


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
    time).

    ``log``: where events go (a resumed fit, an unreadable checkpoint, a fit that cannot take
    one), as JSON records; the pipeline passes the run's ``checkpoints.jsonl``
    (:data:`EVENTS`). Without it they go to stderr. Either way :attr:`resumed` and
    :attr:`unreadable` list them for the stage's summary."""

    def __init__(
        self,
        folder: Path,
        every: int = 0,
        minutes: float | None = 5.0,
        log: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.every = every
        self.minutes = minutes
        self.log = log
        self._started: dict[str, int] = {}
        self._last = time.monotonic()
        self.saved = 0
        self.resumed: list[str] = []
        self.unreadable: list[str] = []

    def event(self, record: dict[str, Any]) -> None:
        """Record one event (see ``log``)."""
        if self.log is not None:
            self.log(record)
        else:
            told = "; ".join(f"{k}: {v}" for k, v in record.items() if k != "event")
            print(f"lvlmva: checkpoint {record.get('event', '')} ({told})", file=sys.stderr)

    def key(self, tag: str) -> str:
        """The key of the next fit tagged ``tag`` in this stage (``<tag>.<k>``, ``k`` counting
        the fits of that tag started before it)."""
        k = self._started.get(tag, 0)
        self._started[tag] = k + 1
        return f"{re.sub(r'[^A-Za-z0-9._=-]+', '_', tag)}.{k}"

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.pt"

    def load(self, key: str) -> dict[str, Any] | None:
        """The state saved under ``key``, or None. A file that cannot be read is recorded as an
        ``"unreadable"`` event (with the reason) and ignored: the fit starts over, which is
        slower and never different."""
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            epoch = int(state["epoch"])
        except Exception as exc:  # noqa: BLE001 - recorded; starting over gives the same weights
            self.unreadable.append(key)
            reason = f"{type(exc).__name__}: {exc}"
            self.event({"event": "unreadable", "key": key, "file": str(path), "reason": reason, "then": "the fit starts over"})
            return None
        self.resumed.append(key)
        self.event({"event": "resumed", "key": key, "epoch": epoch})
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


class FitCheckpoint:
    """The checkpoints of one training loop: its key in the stage's :class:`Checkpoints`, and
    what it saves and restores: the model's and the optimiser's state, torch's global RNG (the
    device's too), the epoch records it logged, and ``parts``: named objects the loop draws
    from or feeds (callbacks, objectives, index draws, data streams), each saved with
    ``state_dict()`` and restored with ``load_state_dict(state)``.

    A loop that has a part which cannot be saved (:func:`stateful` is False) takes no
    checkpoint; that is recorded once as a ``"not-checkpointed"`` event naming the part. Use::

        fit = FitCheckpoint(ctx, tag, model, optimizer, {"on_epoch": callback})
        done = fit.resume()              # epochs already done (0: a fresh start)
        for epoch in range(done + 1, epochs + 1):
            ...
            fit.record(record)           # the epoch's metrics.jsonl line
            fit.after_epoch(epoch)       # saves when a checkpoint is due
    """

    def __init__(
        self,
        ctx: Any,
        tag: str,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        parts: Mapping[str, Any] | None = None,
    ) -> None:
        self.ctx = ctx
        self.model = model
        self.optimizer = optimizer
        self.parts = {name: part for name, part in (parts or {}).items() if part is not None}
        self.records: list[dict[str, Any]] = []
        checkpoints: Checkpoints | None = getattr(ctx, "checkpoints", None)
        unsaved = [name for name, part in self.parts.items() if not stateful(part)]
        if checkpoints is not None and unsaved:
            checkpoints.event(
                {
                    "event": "not-checkpointed",
                    "tag": tag,
                    "reason": f"{', '.join(unsaved)} ha{'s' if len(unsaved) == 1 else 've'} no "
                    "state_dict()/load_state_dict(): the fit starts over if the run is interrupted",
                }
            )
            checkpoints = None
        self.checkpoints = checkpoints
        self.key = checkpoints.key(tag) if checkpoints is not None else ""

    def resume(self) -> int:
        """Restore the last checkpoint of this fit, if there is one, and return the epochs it
        had done (0 when there is none). The restored records are logged again to
        ``metrics.jsonl``, so that this computation's log holds the whole curve."""
        saved = self.checkpoints.load(self.key) if self.checkpoints is not None else None
        if saved is None:
            return 0
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        for name, part in self.parts.items():
            part.load_state_dict(saved["parts"][name])
        set_rng_state(saved["rng"], self.ctx.device)
        for record in saved["records"]:
            self.record(record)
        return int(saved["epoch"])

    def record(self, record: dict[str, Any]) -> None:
        """Log one epoch's record to ``metrics.jsonl`` and keep it for the checkpoints."""
        self.ctx.log_jsonl("metrics.jsonl", record)
        self.records.append(record)

    def after_epoch(self, epoch: int) -> None:
        """Save the fit's state after ``epoch`` (from 1) when a checkpoint is due."""
        if self.checkpoints is None or not self.checkpoints.due(epoch):
            return
        state = {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(self.ctx.device),
            "records": self.records,
            "parts": {name: part.state_dict() for name, part in self.parts.items()},
        }
        self.checkpoints.save(self.key, state)
