"""Training and inference of the task model ``f``.

- :func:`resolve_device` turns a device setting into a ``torch.device``.
- :func:`seed_everything` seeds torch, numpy and ``random`` and asks for deterministic kernels.
- :class:`Trainer` trains a classifier with Adam and cross-entropy, one line per epoch in
  ``metrics.jsonl``: on a split, an index list (repeats allowed) or with sample weights, with a
  callback per epoch (:class:`EpochEnd`). Mitigators receive one, so that baselines train
  exactly as the original model is trained. :func:`train_classifier` is a thin wrapper of it.
- :func:`predict_logits` runs a model over a tensor of images in batches.

Data order is drawn per epoch from ``ctx.generator(f"{tag}-epoch-{e}")``, so the resident-tensor
loop and the DataLoader loop see the same batches in the same order and give the same weights.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .protocols import RunContext
from .records import Split
from .settings import TrainOptions

__all__ = [
    "resolve_device",
    "seed_everything",
    "Trainer",
    "EpochEnd",
    "train_classifier",
    "predict_logits",
    "fits_on_device",
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


@contextlib.contextmanager
def _progress_bar(enabled: bool, description: str, total: int) -> Iterator[Callable[[], None]]:
    """Yields ``advance()``; draws a rich progress bar only when ``enabled``."""
    if not enabled:
        yield lambda: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns) as progress:
        task = progress.add_task(description, total=total)
        yield lambda: progress.advance(task)


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
        indices: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        epochs: int | None = None,
        tag: str = "train",
        on_epoch: Callable[[EpochEnd], bool | None] | None = None,
    ) -> nn.Module:
        """Train ``model`` (a fresh one when ``None``) in place on the device with Adam and
        cross-entropy; return it, in eval mode.

        - ``indices``: int64 ``[M]`` indices into ``split``, repeats allowed (an index listed k
          times is visited k times per epoch); default: every sample once. Epoch ``e`` (from 1)
          visits ``indices[perm]``, ``perm`` a permutation of ``M`` drawn from
          ``ctx.generator(f"{tag}-epoch-{e}")``; batches are consecutive slices of that order,
          the last one possibly smaller.
        - ``weights``: float ``[len(split)]``, >= 0, one per sample of ``split``. A batch's loss
          is ``sum(w_i * ce_i) / sum(w_i)`` (torch's convention for weighted cross-entropy:
          equal weights give the plain mean). A batch whose weights are all zero is forwarded
          (its predictions are recorded) but takes no optimiser step.
        - ``epochs``: default ``options.epochs``.
        - ``on_epoch``: called with an :class:`EpochEnd` after every epoch; returning True stops
          training after that epoch.

        With ``options.resident`` ``"always"`` (or ``"auto"`` when the split fits on the device)
        the split is moved to the device once and batches are slices of it; ``"never"`` reads
        batches through a ``DataLoader``. Both give the same weights.

        After each epoch one line goes to ``metrics.jsonl``: ``stage`` (= ``tag``), ``epoch``,
        ``loss`` (mean cross-entropy over the epoch's visited samples as trained, weighted by
        ``weights`` when given), ``train_accuracy`` (unweighted share of the visited samples
        predicted correctly when trained on) and ``seconds``.
        """
        options, ctx = self._options, self._ctx
        n = len(split)
        if n == 0:
            raise ValueError(f"Trainer.fit[{tag}]: the training split is empty")
        epochs = options.epochs if epochs is None else epochs
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"Trainer.fit[{tag}]: epochs must be an int >= 0, got {epochs!r}")
        indices = _check_indices(indices, n, tag)
        weights = _check_weights(weights, n, indices, tag)
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
        with _progress_bar(ctx.progress, f"{tag}", steps * epochs) as advance:
            for epoch in range(1, epochs + 1):
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
                if resident:
                    batches = _resident_batches(images, labels, order.to(device), batch_size)
                else:
                    batches = _loader_batches(split, order, batch_size, device)
                model.train()
                started = time.perf_counter()
                # Kept on the device: one synchronisation per epoch, not one per batch.
                loss_sum = torch.zeros((), dtype=torch.float64, device=device)
                predicted = torch.empty(m, dtype=torch.int64, device=device)
                for step, (x, y) in enumerate(batches):
                    logits = model(x)
                    start = step * batch_size
                    predicted[start : start + y.shape[0]] = logits.detach().argmax(dim=1)
                    if batch_weights is None:
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
                ctx.log_jsonl(
                    "metrics.jsonl",
                    {
                        "stage": tag,
                        "epoch": epoch,
                        "loss": mean_loss,
                        "train_accuracy": accuracy,
                        "seconds": seconds,
                    },
                )
                if on_epoch is not None:
                    end = EpochEnd(epoch, model, mean_loss, accuracy, seconds, order, predicted)
                    if on_epoch(end) is True:
                        break
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
