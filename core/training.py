"""Training and inference of the task model ``f``.

- :func:`resolve_device` turns a device setting into a ``torch.device``.
- :func:`seed_everything` seeds torch, numpy and ``random`` and asks for deterministic kernels.
- :class:`Trainer` trains a classifier with Adam and cross-entropy, one line per epoch in
  ``metrics.jsonl``: on a split, an index list (repeats allowed) or with sample weights, with a
  callback per epoch (:class:`EpochEnd`). Mitigators receive one, so that baselines train
  exactly as the original model is trained. :func:`train_classifier` is a thin wrapper of it.
- :func:`predict_logits` runs a model over a tensor of images in batches.
- :class:`AlignmentTrainer` is what aligners train with: alignment samples with masks mixed
  with ordinary training samples, Adam, clipping, per-epoch records of the loss terms an
  aligner names, and a grid of loss parameters chosen on the validation split.
  :class:`LossAligner` is an aligner made of a loss function alone (``AlignmentLoss``);
  :class:`AlignmentOptions` are the options every such aligner has.
- :func:`first_best` is the rule of every grid choice on the validation split: the highest
  score, ties to the first point (mitigators and aligners share it).

Data order is drawn per epoch from ``ctx.generator(f"{tag}-epoch-{e}")``, so the resident-tensor
loop and the DataLoader loop see the same batches in the same order and give the same weights.
"""

from __future__ import annotations

import abc
import copy
import itertools
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from . import model_selection
from .checkpoints import FitCheckpoint
from .model_selection import SelectionRule
from .protocols import PluginOptions, RunContext
from .records import AlignmentSet, Split, SpuriousDataset, TrainedModel
from .settings import TrainOptions

__all__ = [
    "resolve_device",
    "seed_everything",
    "Trainer",
    "EpochEnd",
    "BatchObjective",
    "train_classifier",
    "predict_logits",
    "fits_on_device",
    "first_best",
    "AlignmentLoss",
    "AlignmentOptions",
    "AlignmentTrainer",
    "LossAligner",
    "alignment_grid_problems",
    "TOTAL",
]

# Share of free device memory a resident split may take on an accelerator: the rest is left for
# the model, its gradients, the optimiser state and activations.
_RESIDENT_SHARE = 0.5


def resolve_device(spec: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is parsed by ``torch.device``.

    Raises ``ValueError`` for a CUDA device when CUDA is not available (instead of failing later
    in the middle of a stage).
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise ValueError(f"run.device: {spec!r} is not a torch device ({err})") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"run.device: {spec!r} asks for CUDA, but CUDA is not available here")
    return device


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed torch (CPU and CUDA), numpy's global generator and ``random``.

    With ``deterministic``, torch is asked for deterministic kernels (``warn_only=True``: an
    operation without a deterministic implementation warns instead of failing), cuDNN
    benchmarking is turned off and cuBLAS gets the workspace setting it needs for reproducible
    results.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS reads this when its handle is created; it must be set before the first CUDA matmul.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)


def fits_on_device(split: Split, device: torch.device) -> bool:
    """Whether ``split``'s images and labels can be held on ``device`` for the whole training.

    On the CPU the split is already in memory, so it always fits; on CUDA it fits when it takes
    at most half of the free device memory.
    """
    if device.type != "cuda":
        return True
    needed = split.images.nbytes + split.labels.nbytes
    free, _total = torch.cuda.mem_get_info(device)
    return needed <= _RESIDENT_SHARE * free


def _can_fuse(model: nn.Module, device: torch.device) -> bool:
    """Whether Adam's fused kernel applies: one kernel for all parameters instead of several per
    parameter, which on small models is most of the step's time on a CPU."""
    if device.type not in ("cpu", "cuda"):
        return False
    if device.type == "cpu" and tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 4):
        return False  # fused Adam on the CPU arrived in torch 2.4
    return all(p.is_floating_point() for p in model.parameters())


def _resident_batches(
    images: torch.Tensor, labels: torch.Tensor, order: torch.Tensor, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, order.shape[0], batch_size):
        index = order[start : start + batch_size]
        yield images.index_select(0, index), labels.index_select(0, index)


def _loader_batches(
    split: Split, order: torch.Tensor, batch_size: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    pin = device.type == "cuda"
    # The epoch's permutation is the sampler, so both loops see identical batches.
    loader = DataLoader(
        TensorDataset(split.images, split.labels),
        batch_size=batch_size,
        sampler=order.tolist(),
        pin_memory=pin,
    )
    norm = split.normalization
    for x, y in loader:
        x = x.to(device, non_blocking=pin)
        yield (x if norm is None else norm.apply(x)), y.to(device, non_blocking=pin)


#: ``objective(model, x, y, idx) -> (loss, logits)``: a batch loss for :meth:`Trainer.fit`
BatchObjective = Callable[
    [nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]


@dataclass(frozen=True)
class EpochEnd:
    """What :meth:`Trainer.fit` reports to ``on_epoch`` after each epoch.

    - ``epoch``: counted from 1; ``model``: the model being trained (the same object: copy it to
      keep a snapshot); ``loss``, ``train_accuracy``, ``seconds``: as logged in ``metrics.jsonl``.
    - ``order``: int64 ``[M]``, the split indices visited this epoch, in order.
    - ``predicted``: int64 ``[M]``, the class each visited sample was predicted as when it was
      trained on (its batch's logits before the optimiser step, in train mode): what JTT builds
      its error set from.
    """

    epoch: int
    model: nn.Module
    loss: float
    train_accuracy: float
    seconds: float
    order: torch.Tensor
    predicted: torch.Tensor


class Trainer:
    """Trains models exactly as the original model ``f`` is trained: what a mitigator receives.

    ``build_model`` makes a fresh untrained model from torch's global generator (the pipeline
    seeds it per stage, so successive calls give different, reproducible initialisations);
    ``options`` and ``ctx`` give the optimiser settings, the device, the seeds of the data order
    and the progress setting.
    """

    def __init__(
        self, build_model: Callable[[], nn.Module], options: TrainOptions, ctx: RunContext
    ) -> None:
        self._build_model = build_model
        self._options = options
        self._ctx = ctx

    @property
    def options(self) -> TrainOptions:
        return self._options

    @property
    def device(self) -> torch.device:
        return self._ctx.device

    @property
    def ctx(self) -> RunContext:
        return self._ctx

    def new_model(self) -> nn.Module:
        """A fresh untrained model."""
        model = self._build_model()
        if not isinstance(model, nn.Module):
            raise TypeError(f"Trainer: build_model returned {type(model).__name__}, not a Module")
        return model

    def predict(
        self, model: nn.Module, images: torch.Tensor, batch_size: int = 1024
    ) -> torch.Tensor:
        """Logits of ``model`` for ``images`` on the trainer's device (:func:`predict_logits`)."""
        return predict_logits(model, images, self.device, batch_size)

    def fit(
        self,
        split: Split,
        model: nn.Module | None = None,
        *,
        indices: torch.Tensor | Callable[[int], torch.Tensor] | None = None,
        weights: torch.Tensor | None = None,
        epochs: int | None = None,
        tag: str = "train",
        on_epoch: Callable[[EpochEnd], bool | None] | None = None,
        objective: BatchObjective | None = None,
    ) -> nn.Module:
        """Train ``model`` (a fresh one when ``None``) in place on the device with Adam and
        cross-entropy (or ``objective``); return it, in eval mode.

        - ``indices``: int64 ``[M]`` indices into ``split``, repeats allowed (an index listed k
          times is visited k times per epoch); default: every sample once. Epoch ``e`` (from 1)
          visits ``indices[perm]``, ``perm`` a permutation of ``M`` drawn from
          ``ctx.generator(f"{tag}-epoch-{e}")``; batches are consecutive slices of that order,
          the last one possibly smaller.
          ``indices`` may also be a function of the epoch (from 1) that returns that epoch's
          list, for methods that draw anew every epoch (RWY and RWG's weighted sampler with
          replacement): it is called once at the start of each epoch, in order.
        - ``weights``: float ``[len(split)]``, >= 0, one per sample of ``split``. A batch's loss
          is ``sum(w_i * ce_i) / sum(w_i)`` (torch's convention for weighted cross-entropy:
          equal weights give the plain mean). A batch whose weights are all zero is forwarded
          (its predictions are recorded) but takes no optimiser step.
        - ``objective``: the batch loss in place of cross-entropy, for methods whose loss is not
          a fixed weighting of the samples (GroupDRO's online group weights, LfF's pair of
          models): called as ``objective(model, x, y, idx)`` in train mode, ``idx`` the batch's
          int64 indices into ``split`` on the device, it returns ``(loss, logits)``: the scalar
          to minimise and the ``[B, K]`` logits whose argmax is recorded as the batch's
          prediction. Every parameter of ``model`` is optimised (one Adam). Not with
          ``weights``.
        - ``epochs``: default ``options.epochs``.
        - ``on_epoch``: called with an :class:`EpochEnd` after every epoch; returning True stops
          training after that epoch.

        With ``options.resident`` ``"always"`` (or ``"auto"`` when the split fits on the device)
        the split is moved to the device once and batches are slices of it; ``"never"`` reads
        batches through a ``DataLoader``. Both give the same weights.

        After each epoch one line goes to ``metrics.jsonl``: ``stage`` (= ``tag``), ``epoch``,
        ``loss`` (mean cross-entropy over the epoch's visited samples as trained, weighted by
        ``weights`` when given; with ``objective``, the mean of its batch losses weighted by
        batch size), ``train_accuracy`` (unweighted share of the visited samples
        predicted correctly when trained on) and ``seconds``.
        """
        options, ctx = self._options, self._ctx
        n = len(split)
        if n == 0:
            raise ValueError(f"Trainer.fit[{tag}]: the training split is empty")
        epochs = options.epochs if epochs is None else epochs
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"Trainer.fit[{tag}]: epochs must be an int >= 0, got {epochs!r}")
        draw = indices if callable(indices) else None
        if draw is not None:
            indices = draw(1) if epochs > 0 else None
        indices = _check_indices(indices, n, tag)
        weights = _check_weights(weights, n, indices, tag)
        if objective is not None and weights is not None:
            raise ValueError(f"Trainer.fit[{tag}]: give weights or an objective, not both")
        if model is None:
            model = self.new_model()

        device = ctx.device
        model.to(device)
        optimizer = torch.optim.Adam(
            model.parameters(),
            lr=options.lr,
            weight_decay=options.weight_decay,
            fused=_can_fuse(model, device),
        )
        if options.resident == "always":
            resident = True
        elif options.resident == "never":
            resident = False
        else:
            resident = fits_on_device(split, device)
        if resident:
            # uint8 storage stays uint8 on the device; batches are normalised as they are drawn
            images = split.inputs.to(device)
            labels = split.labels.to(device)

        m = n if indices is None else int(indices.shape[0])
        batch_size = options.batch_size
        steps = -(-m // batch_size)
        # Resumed from the stage's last checkpoint of this fit, if any (lvlmva.checkpoints)
        checkpoint = FitCheckpoint(
            ctx, tag, model, optimizer, {"on_epoch": on_epoch, "objective": objective, "draw": draw}
        )
        first = checkpoint.resume() + 1
        with ctx.progress_bar(tag, steps * epochs, completed=steps * min(first - 1, epochs)) as advance:
            for epoch in range(first, epochs + 1):
                if draw is not None and epoch > 1:
                    indices = _check_indices(draw(epoch), n, tag)
                    _check_weights(weights, n, indices, tag)
                    m = int(indices.shape[0])
                    steps = -(-m // batch_size)
                order = torch.randperm(m, generator=ctx.generator(f"{tag}-epoch-{epoch}"))
                if indices is not None:
                    order = indices[order]
                if weights is None:
                    batch_weights, stepped = None, None
                else:
                    visited = weights[order]
                    total_weight = float(visited.double().sum())
                    # Decided on the CPU, so skipping an all-zero batch costs no synchronisation.
                    sums = torch.zeros(steps, dtype=torch.float64)
                    sums.index_add_(0, torch.arange(m) // batch_size, visited.double())
                    stepped = (sums > 0).tolist()
                    batch_weights = visited.to(device).split(batch_size)
                order_on_device = order.to(device)
                if resident:
                    batches = _resident_batches(images, labels, order_on_device, batch_size)
                else:
                    batches = _loader_batches(split, order, batch_size, device)
                model.train()
                started = time.perf_counter()
                # Kept on the device: one synchronisation per epoch, not one per batch.
                loss_sum = torch.zeros((), dtype=torch.float64, device=device)
                predicted = torch.empty(m, dtype=torch.int64, device=device)
                for step, (x, y) in enumerate(batches):
                    start = step * batch_size
                    if objective is None:
                        logits = model(x)
                    else:
                        idx = order_on_device[start : start + y.shape[0]]
                        loss, logits = objective(model, x, y, idx)
                    predicted[start : start + y.shape[0]] = logits.detach().argmax(dim=1)
                    if objective is not None:
                        loss_sum += loss.detach().double() * y.shape[0]
                    elif batch_weights is None:
                        loss = F.cross_entropy(logits, y)
                        loss_sum += loss.detach().double() * y.shape[0]
                    elif stepped[step]:
                        w = batch_weights[step].to(logits.dtype)
                        weighted = (w * F.cross_entropy(logits, y, reduction="none")).sum()
                        loss = weighted / w.sum()
                        loss_sum += weighted.detach().double()
                    else:
                        advance()
                        continue
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    advance()
                predicted = predicted.cpu()
                mean_loss = float(loss_sum) / (m if weights is None else total_weight)
                accuracy = int((predicted == split.labels[order]).sum()) / m
                seconds = time.perf_counter() - started
                if not np.isfinite(mean_loss):
                    raise FloatingPointError(
                        f"Trainer.fit[{tag}]: loss is {mean_loss} after epoch {epoch} "
                        f"(lr {options.lr}); lower the learning rate or check the input scale"
                    )
                record = {
                    "stage": tag,
                    "epoch": epoch,
                    "loss": mean_loss,
                    "train_accuracy": accuracy,
                    "seconds": seconds,
                }
                checkpoint.record(record)
                if on_epoch is not None:
                    end = EpochEnd(epoch, model, mean_loss, accuracy, seconds, order, predicted)
                    if on_epoch(end) is True:
                        break  # no checkpoint: a resumed fit reaches this stop again
                checkpoint.after_epoch(epoch)
        model.eval()
        return model


def _check_indices(indices: torch.Tensor | None, n: int, tag: str) -> torch.Tensor | None:
    if indices is None:
        return None
    where = f"Trainer.fit[{tag}]: indices"
    if not isinstance(indices, torch.Tensor):
        raise ValueError(f"{where} must be a 1-D int64 tensor, got {type(indices).__name__}")
    if indices.dtype != torch.int64 or indices.dim() != 1:
        raise ValueError(
            f"{where} must be a 1-D int64 tensor (a bool mask: use .nonzero()), "
            f"got {indices.dtype} {list(indices.shape)}"
        )
    if indices.numel() == 0:
        raise ValueError(f"{where} is empty: there is nothing to train on")
    indices = indices.detach().cpu()
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= n:
        raise ValueError(f"{where} must lie in [0, {n}) for a split of {n}, got {low}..{high}")
    return indices


def _check_weights(
    weights: torch.Tensor | None, n: int, indices: torch.Tensor | None, tag: str
) -> torch.Tensor | None:
    if weights is None:
        return None
    where = f"Trainer.fit[{tag}]: weights"
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        got = weights.dtype if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise ValueError(f"{where} must be a float tensor, got {got}")
    if tuple(weights.shape) != (n,):
        raise ValueError(f"{where} must be [{n}] (one per sample), got {list(weights.shape)}")
    weights = weights.detach().cpu()
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError(f"{where} must be finite and >= 0, got min {float(weights.min())}")
    used = weights if indices is None else weights[indices]
    if not bool((used > 0).any()):
        raise ValueError(f"{where} are zero on every sample trained on: no step would be taken")
    return weights


def _no_builder() -> nn.Module:
    raise RuntimeError("this Trainer was made by train_classifier, without a model builder")


def train_classifier(
    model: nn.Module,
    split: Split,
    options: TrainOptions,
    ctx: RunContext,
    *,
    tag: str = "train",
) -> nn.Module:
    """``Trainer(..., options, ctx).fit(split, model, tag=tag)``: kept for callers not yet moved
    to :class:`Trainer`."""
    return Trainer(_no_builder, options, ctx).fit(split, model, tag=tag)


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: torch.Tensor, device: torch.device | str, batch_size: int = 1024
) -> torch.Tensor:
    """Logits of ``model`` for ``images`` ``[N, C, H, W]``: float32 ``[N, K]`` on the CPU.

    Runs in eval mode without gradients, ``batch_size`` images at a time on ``device`` (the
    model is moved there); the model's train/eval mode is restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"predict_logits: batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    was_training = model.training
    model.to(device)
    model.eval()
    try:
        chunks = [
            model(images[start : start + batch_size].to(device)).float().cpu()
            for start in range(0, images.shape[0], batch_size)
        ]
        if not chunks:
            # An empty input still needs the number of classes: probe with one zero image.
            probe = torch.zeros((1, *images.shape[1:]), dtype=images.dtype, device=device)
            chunks = [model(probe).float().cpu()[:0]]
    finally:
        model.train(was_training)
    return torch.cat(chunks)


def first_best(values: Sequence[float]) -> int:
    """Index of the highest of ``values``, ties to the first: the rule of every grid choice on
    the validation split. A NaN never wins over an earlier value (it compares as not higher)."""
    if not values:
        raise ValueError("first_best: no values to choose from")
    best = 0
    for index, value in enumerate(values):
        if value > values[best]:
            best = index
    return best


# -- alignment --------------------------------------------------------------------------------

#: The name of the total among the terms an alignment loss returns: what the optimiser minimises.
TOTAL = "loss"

#: Record keys that a loss term or a loss parameter may not be named (they mean something else in
#: ``metrics.jsonl``).
_RESERVED_KEYS = frozenset(
    {"stage", "epoch", "steps", "seconds", "train_accuracy", "run_stage", "run_attempt"}
)

#: The score of a grid row each ``selection`` rule compares (:mod:`lvlmva.model_selection`).
_SELECTION_SCORES = {
    "average": "val_accuracy",
    "worst-group": "val_wga",
    "worst-class": "val_wca",
    "oracle-test": "test_wga",
}

AlignmentLoss = Callable[..., Mapping[str, torch.Tensor]]
"""An aligner's loss: ``loss(model, inputs, targets, masks, **params)`` returns its terms by
name, scalar tensors, with the total under ``"loss"`` (:data:`TOTAL`): e.g. RRR's
``{"loss": ce + lam * penalty, "ce": ce, "penalty": penalty}``. ``inputs`` float ``[B, C, H, W]``
on the device, ``targets`` int64 ``[B]``, ``masks`` bool ``[B, H, W]`` (all False for the
ordinary samples); ``params`` are the aligner's loss parameters (one grid point's values).
A trainer made with ``relevant=True`` also passes ``relevant=``, bool ``[B, H, W]``: the
regions judged relevant of each alignment sample (``AlignmentSet.relevant``), all False for the
ordinary samples, which have none."""


class AlignmentOptions(PluginOptions):
    """The options every aligner trained by :class:`AlignmentTrainer` has (an aligner's own loss
    options come beside them)."""

    selection: SelectionRule = Field(
        "average",
        description="How a grid of loss parameters is decided: 'average' (validation accuracy; "
        "needs no group labels, LVLM-VA's premise; the default), 'worst-class' (the lowest "
        "per-class validation accuracy; no group labels), 'worst-group' (worst-group validation "
        "accuracy; needs group labels on the validation split), or 'oracle-test' (worst-group "
        "accuracy on the test split: an upper bound, labelled so wherever it appears). Unused "
        "without a grid; only 'oracle-test' reads the test split.",
    )
    epochs: int = Field(3, ge=0, description="Passes over the ordinary training samples.")
    lr: float = Field(
        1e-3, gt=0, description="Adam learning rate (the paper used 1e-5 with 1000 epochs)."
    )
    weight_decay: float = Field(
        0.0, ge=0, description="Adam weight decay (gamma; 0 in the method)."
    )
    alignment_batch: int = Field(
        8, ge=1, description="Alignment samples per step (cycled through a seeded permutation)."
    )
    ordinary_batch: int = Field(
        64, ge=0, description="Ordinary training samples per step (mask A = 0)."
    )
    max_steps_per_epoch: int | None = Field(
        None,
        ge=1,
        description="Stop an epoch after this many steps (quick runs); None = full pass.",
    )
    max_grad_norm: float | None = Field(
        None,
        gt=0,
        description="Clip the parameter gradient's norm to this value before each Adam step "
        "(torch.nn.utils.clip_grad_norm_); None = no clipping, as in the method.",
    )


def _grid(params: Mapping[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """``params`` split into the fixed values and the grid points: a tuple or list value is a
    grid axis, the points are the product of the axes in the order given (the last axis varies
    fastest). ``None`` when no value is a grid."""
    fixed = {k: v for k, v in params.items() if not isinstance(v, (tuple, list))}
    axes = {k: tuple(v) for k, v in params.items() if isinstance(v, (tuple, list))}
    if not axes:
        return fixed, None
    points = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
    return fixed, points


def alignment_grid_problems(
    data: SpuriousDataset, params: Mapping[str, Any], selection: str
) -> list[str]:
    """What would stop a grid of loss parameters (``params`` with a tuple value) from being
    chosen on ``data``: no (or an empty) validation split, or a ``selection`` rule without the
    group labels it compares. Parameters without a grid need neither."""
    _fixed, points = _grid(params)
    if points is None:
        return []
    names = " x ".join(k for k, v in params.items() if isinstance(v, (tuple, list)))
    grid = f"{names} is a grid of {len(points)} values"
    if data.val is None or len(data.val) == 0:
        return [
            f"{grid}, chosen on the validation split, but the data set has "
            f"{'no' if data.val is None else 'an empty'} validation split: add one or give "
            f"{names} a single value"
        ]
    chosen = model_selection.rule(selection)
    split = data.val if chosen.split == "val" else data.test
    if chosen.needs_groups and (split is None or split.groups is None):
        words = "validation" if chosen.split == "val" else "test"
        return [
            f"selection = {selection!r} (for the {grid}) needs group labels on the {words} "
            "split, which has none: use selection = 'average' or 'worst-class', or a data set "
            "with groups"
        ]
    return []


class _CyclingPermutation:
    """An endless stream of indices ``0..n-1``: seeded permutations, one after another."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n = n
        self.generator = generator
        self.buffer = torch.empty(0, dtype=torch.int64)

    def take(self, k: int) -> torch.Tensor:
        while self.buffer.numel() < k:
            self.buffer = torch.cat([self.buffer, torch.randperm(self.n, generator=self.generator)])
        out, self.buffer = self.buffer[:k], self.buffer[k:]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = state["buffer"]
        self.generator.set_state(state["generator"])


class AlignmentTrainer:
    """What an aligner trains with: give it a loss (:data:`AlignmentLoss`), get an aligned copy.

    Each step takes ``alignment_batch`` alignment samples with their masks and
    ``ordinary_batch`` training samples with empty masks, and takes one Adam step (``lr``,
    ``weight_decay``) on the loss's total, the parameter gradient clipped to ``max_grad_norm``
    when set. An epoch is one pass over the training split in ``ordinary_batch`` steps (over the
    alignment set in ``alignment_batch`` steps when ``ordinary_batch`` is 0), at most
    ``max_steps_per_epoch`` steps. Tensors stay where the data set keeps them; each step's batch
    moves to ``ctx.device``.

    Seeds, all from ``ctx.generator`` with the aligner's ``seed_name`` (RRR: ``"rrr"``):

    - the alignment samples: seeded permutations of the alignment set one after another
      (``f"{seed_name}-alignment-order"``), cycled across steps and epochs;
    - the ordinary samples: a permutation of the training split per epoch
      (``f"{seed_name}-epoch-{e}"``, ``e`` counted from 0);
    - stochastic layers (dropout) draw from torch's global generator, seeded from
      ``f"{seed_name}-stochastic-layers"`` inside a fork that restores it afterwards, so that
      aligning does not shift other stages' numbers.

    After each epoch one line goes to ``metrics.jsonl``: ``stage`` (``tag``), ``epoch`` (from
    1), a grid point's parameters when aligning over a grid, the mean of every loss term over
    the epoch's steps under the loss's names, ``steps`` and ``seconds``. A total that is not
    finite stops the alignment with a ``FloatingPointError`` naming the terms.

    ``who`` names the aligner in messages and progress bars. Whether kernels are deterministic
    is the run's setting (``run.deterministic``), applied by the pipeline around every stage.

    With ``relevant=True`` the loss also gets ``relevant=``, each batch's regions judged
    relevant (``alignment.relevant`` for the alignment samples, all False for the ordinary
    ones), for losses that reward attribution there (HINT); an alignment set without them is
    refused before training.
    """

    def __init__(
        self,
        options: AlignmentOptions,
        ctx: RunContext,
        *,
        seed_name: str,
        who: str,
        tag: str = "align",
        relevant: bool = False,
    ) -> None:
        self.options = options
        self.ctx = ctx
        self.seed_name = seed_name
        self.who = who
        self.tag = tag
        self.relevant = relevant

    def align(
        self,
        model: nn.Module,
        data: SpuriousDataset,
        alignment: AlignmentSet,
        masks: torch.Tensor,
        loss: AlignmentLoss,
        params: Mapping[str, Any] | None = None,
    ) -> nn.Module | TrainedModel:
        """An aligned copy of ``model`` (in eval mode; ``model`` is left unchanged).

        ``params`` are keyword arguments of ``loss``; a tuple (or list) value is a grid. Without
        a grid, one alignment, returned as a module. With one, one alignment per grid point
        (the product of the tuples), each from ``model`` with the same seeded batches, each
        scored on the validation split; the first best by ``selection`` is returned as a
        ``TrainedModel`` whose details hold the criterion, every point's scores (``grid``) and
        the point ``chosen``. One ``f"{tag}-select"`` line per point goes to ``metrics.jsonl``.
        Only the best model so far is kept, so the points never need to fit in memory at once.
        """
        params = dict(params or {})
        problems = alignment_grid_problems(data, params, self.options.selection)
        if problems:
            raise ValueError(f"{self.who}: " + "; ".join(problems))
        self._check_inputs(data.train, alignment, masks)
        fixed, points = _grid(params)
        if points is None:
            return self.fit(model, data.train, alignment, masks, loss, fixed)

        key = _SELECTION_SCORES[self.options.selection]
        rows: list[dict[str, Any]] = []
        values: list[float] = []
        best: tuple[nn.Module, dict[str, Any]] | None = None
        for point in points:
            aligned = self.fit(
                model, data.train, alignment, masks, loss, {**fixed, **point}, tags=point
            )
            scores = self.validation_scores(aligned, data)
            rows.append({**point, **scores})
            self.ctx.log_jsonl("metrics.jsonl", {"stage": f"{self.tag}-select", **point, **scores})
            values.append(-math.inf if scores[key] is None else scores[key])
            if first_best(values) == len(values) - 1:
                best = (aligned, point)
        assert best is not None  # the first point is the best of one
        details = {
            "criterion": model_selection.rule(self.options.selection).criterion,
            "selection": model_selection.selection_record(self.options.selection),
            "grid": rows,
            "chosen": dict(best[1]),
        }
        return TrainedModel(best[0], details)

    def validation_scores(self, model: nn.Module, data: SpuriousDataset) -> dict[str, Any]:
        """``val_accuracy``, ``val_wga``, ``val_aga`` and ``val_wca`` (worst-class) of ``model``
        on the validation split (the group scores None without group labels); under
        ``selection = "oracle-test"`` also ``test_accuracy`` and ``test_wga`` on the test split."""
        val = data.val
        if val is None:
            raise ValueError(f"{self.who}: there is no validation split to score on")
        scores: dict[str, Any] = {}
        splits = [("val", val)]
        if self.options.selection == "oracle-test":
            splits.append(("test", data.test))
        for prefix, split in splits:
            logits = predict_logits(model, split.inputs, self.ctx.device)
            num_groups = 0
            if split.groups is not None:
                num_groups = len(data.group_names) or int(split.groups.max()) + 1
            found = model_selection.selection_scores(logits, split, num_groups, data.num_classes)
            scores[f"{prefix}_accuracy"] = found["accuracy"]
            scores[f"{prefix}_wga"] = found["worst_group_accuracy"]
            if prefix == "val":
                scores["val_aga"] = found["average_group_accuracy"]
                scores["val_wca"] = found["worst_class_accuracy"]
        return scores

    def _check_inputs(self, train: Split, alignment: AlignmentSet, masks: torch.Tensor) -> None:
        n_align = len(alignment)
        if n_align == 0:
            raise ValueError(f"{self.who}: the alignment set is empty (no sample has a valid mask)")
        spatial = tuple(train.images.shape[2:])
        if masks.dim() != 3 or masks.shape[0] != n_align or tuple(masks.shape[1:]) != spatial:
            raise ValueError(
                f"{self.who}: masks must be [{n_align},{spatial[0]},{spatial[1]}] for the "
                f"alignment set, got {tuple(masks.shape)}"
            )
        if self.options.ordinary_batch > 0 and len(train) == 0:
            raise ValueError(f"{self.who}: the training split is empty")
        if self.relevant:
            relevant = alignment.relevant
            if relevant is None:
                raise ValueError(
                    f"{self.who}: rewards attribution in the regions judged relevant, and the "
                    "alignment set has none (AlignmentSet.relevant is None)"
                )
            if tuple(relevant.shape) != (n_align, *spatial):
                raise ValueError(
                    f"{self.who}: the relevant regions must be [{n_align},{spatial[0]},"
                    f"{spatial[1]}] for the alignment set, got {tuple(relevant.shape)}"
                )

    def fit(
        self,
        model: nn.Module,
        train: Split,
        alignment: AlignmentSet,
        masks: torch.Tensor,
        loss: AlignmentLoss,
        params: Mapping[str, Any] | None = None,
        *,
        tags: Mapping[str, Any] | None = None,
    ) -> nn.Module:
        """One alignment of a copy of ``model`` with ``loss(model, inputs, targets, masks,
        **params)``; returns the copy in eval mode. ``tags`` (a grid point) are added to every
        epoch record and the progress label. Every call draws the same seeded batches (no seed
        depends on ``params``), so fits with different parameters differ by the loss alone."""
        self._check_inputs(train, alignment, masks)
        opts, ctx = self.options, self.ctx
        params = dict(params or {})
        tags = dict(tags or {})
        reserved = _RESERVED_KEYS | {TOTAL} | ({"relevant"} if self.relevant else set())
        clash = sorted((set(params) | set(tags)) & reserved)
        if clash:
            raise ValueError(f"{self.who}: loss parameters may not be named {clash}")
        n_align = len(alignment)
        spatial = tuple(train.images.shape[2:])
        n_train = len(train)

        device = ctx.device
        aligned = copy.deepcopy(model).to(device)
        aligned.train()
        optimiser = torch.optim.Adam(
            aligned.parameters(), lr=opts.lr, weight_decay=opts.weight_decay
        )

        align_images = train.inputs[alignment.indices]
        align_labels = train.labels[alignment.indices]
        align_masks = masks.to(torch.bool)
        ordinary_masks = torch.zeros(
            (min(opts.ordinary_batch, n_train), *spatial), dtype=torch.bool
        )
        align_relevant = alignment.relevant.to(torch.bool) if self.relevant else None
        align_stream = _CyclingPermutation(
            n_align, ctx.generator(f"{self.seed_name}-alignment-order")
        )

        if opts.ordinary_batch > 0:
            steps = math.ceil(n_train / opts.ordinary_batch)
        else:
            steps = math.ceil(n_align / opts.alignment_batch)
        if opts.max_steps_per_epoch is not None:
            steps = min(steps, opts.max_steps_per_epoch)
        shown = ", ".join([self.who, *(f"{k} {v:g}" for k, v in tags.items())])
        names: list[str] | None = None

        cuda_devices = [device] if device.type == "cuda" else []
        with (
            torch.random.fork_rng(devices=cuda_devices),
            ctx.progress_bar(f"{self.tag} ({shown})", opts.epochs * steps) as advance,
        ):
            torch.manual_seed(ctx.generator(f"{self.seed_name}-stochastic-layers").initial_seed())
            checkpoint = FitCheckpoint(ctx, self.tag, aligned, optimiser, {"alignment_order": align_stream})
            done = checkpoint.resume()
            advance(done * steps)
            for epoch in range(done, opts.epochs):
                start = time.perf_counter()
                order = torch.randperm(
                    n_train, generator=ctx.generator(f"{self.seed_name}-epoch-{epoch}")
                )
                totals: torch.Tensor | None = None
                for step in range(steps):
                    a_idx = align_stream.take(opts.alignment_batch)
                    o_idx = order[step * opts.ordinary_batch : (step + 1) * opts.ordinary_batch]
                    inputs = torch.cat([align_images[a_idx], train.inputs[o_idx]]).to(device)
                    targets = torch.cat([align_labels[a_idx], train.labels[o_idx]]).to(device)
                    batch_masks = torch.cat(
                        [align_masks[a_idx], ordinary_masks[: o_idx.numel()]]
                    ).to(device)
                    if align_relevant is None:
                        terms = loss(aligned, inputs, targets, batch_masks, **params)
                    else:
                        batch_relevant = torch.cat(
                            [align_relevant[a_idx], ordinary_masks[: o_idx.numel()]]
                        ).to(device)
                        terms = loss(
                            aligned, inputs, targets, batch_masks, relevant=batch_relevant, **params
                        )
                    names = self._check_terms(terms, names, {**params, **tags})
                    total = terms[TOTAL]
                    if not torch.isfinite(total):
                        told = ", ".join(
                            [
                                *(f"{k} {v.item()}" for k, v in terms.items() if k != TOTAL),
                                *(f"{k} {v:g}" for k, v in params.items()),
                            ]
                        )
                        lower = " or ".join([*params, "lr"])
                        raise FloatingPointError(
                            f"{self.who}: loss became {total.item()} at epoch {epoch + 1} step "
                            f"{step + 1} ({told}); lower {lower}"
                        )
                    optimiser.zero_grad(set_to_none=True)
                    total.backward()
                    if opts.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(aligned.parameters(), opts.max_grad_norm)
                    optimiser.step()
                    # float64 sums on the CPU, in the loss's order of terms
                    sums = torch.stack(
                        [terms[k].detach().reshape(()).double() for k in names]
                    ).cpu()
                    totals = sums if totals is None else totals + sums
                    advance()
                assert totals is not None and names is not None  # an epoch has at least one step
                means = (totals / max(steps, 1)).tolist()
                record = {
                    "stage": self.tag,
                    "epoch": epoch + 1,  # counted from 1, as the trainer counts
                    **tags,
                    **dict(zip(names, means, strict=True)),
                    "steps": steps,
                    "seconds": time.perf_counter() - start,
                }
                checkpoint.record(record)
                checkpoint.after_epoch(epoch + 1)
        aligned.eval()
        return aligned

    def _check_terms(
        self, terms: Any, names: list[str] | None, params: Mapping[str, Any]
    ) -> list[str]:
        """The names of ``terms`` (the loss's return value), checked: a mapping with the total,
        each term one number, the same names at every step, none that means something else in
        the epoch record (a record key or a loss parameter)."""
        if not isinstance(terms, Mapping) or TOTAL not in terms:
            raise TypeError(
                f"{self.who}: the loss must return a mapping of named terms with the total under "
                f"{TOTAL!r}, got {type(terms).__name__}"
                + (f" with keys {sorted(terms)}" if isinstance(terms, Mapping) else "")
            )
        found = list(terms)
        if names is not None:
            if found != names:
                raise ValueError(
                    f"{self.who}: the loss returned terms {found} after {names} at the step before"
                )
            return names
        bad = [k for k in found if not isinstance(k, str) or k in _RESERVED_KEYS or k in params]
        if bad:
            raise ValueError(
                f"{self.who}: loss terms may not be named {bad} (names of the epoch record)"
            )
        for k in found:
            v = terms[k]
            if not isinstance(v, torch.Tensor) or v.numel() != 1:
                shape = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise TypeError(
                    f"{self.who}: loss term {k!r} must be a one-number tensor, got {shape}"
                )
        return found


class LossAligner(abc.ABC):
    """An aligner made of its loss: a subclass sets ``Options`` (an :class:`AlignmentOptions`
    subclass) and ``seed_name``, and defines :meth:`loss`; :meth:`loss_params`
    gives the loss's parameters (a tuple value is a grid chosen on the validation split).
    ``align`` and ``check_data`` are :class:`AlignmentTrainer`'s."""

    Options: ClassVar[type[PluginOptions]] = AlignmentOptions
    #: the name the aligner's seeds are drawn under (``ctx.generator(f"{seed_name}-...")``)
    seed_name: ClassVar[str]
    #: :meth:`loss` takes ``relevant=``, each batch's regions judged relevant (all False for
    #: the ordinary samples): the trainer passes them and refuses an alignment set without them
    needs_relevant: ClassVar[bool] = False

    def __init__(self, options: AlignmentOptions) -> None:
        self.options = options

    @abc.abstractmethod
    def loss(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        masks: torch.Tensor,
        **params: Any,
    ) -> Mapping[str, torch.Tensor]:
        """The loss terms of one batch (:data:`AlignmentLoss`)."""

    def loss_params(self) -> Mapping[str, Any]:
        """Keyword arguments of :meth:`loss` from the options; a tuple value is a grid."""
        return {}

    def trainer(self, ctx: RunContext) -> AlignmentTrainer:
        return AlignmentTrainer(
            self.options,
            ctx,
            seed_name=self.seed_name,
            who=type(self).__name__,
            relevant=self.needs_relevant,
        )

    def check_data(self, data: SpuriousDataset) -> list[str]:
        """What would stop a grid of loss parameters (:func:`alignment_grid_problems`)."""
        return alignment_grid_problems(data, self.loss_params(), self.options.selection)

    def align(
        self,
        model: nn.Module,
        data: SpuriousDataset,
        alignment: AlignmentSet,
        masks: torch.Tensor,
        ctx: RunContext,
    ) -> nn.Module | TrainedModel:
        """An aligned copy of ``model``; for a grid of loss parameters, the best on the
        validation split as a ``TrainedModel`` (:meth:`AlignmentTrainer.align`)."""
        return self.trainer(ctx).align(model, data, alignment, masks, self.loss, self.loss_params())
