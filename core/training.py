"""Training and inference of the task model ``f``.

- :func:`resolve_device` turns a device setting into a ``torch.device``.
- :func:`seed_everything` seeds torch, numpy and ``random`` and asks for deterministic kernels.
- :func:`train_classifier` trains a classifier with Adam and cross-entropy, one line per epoch in
  ``metrics.jsonl``.
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
    for x, y in loader:
        yield x.to(device, non_blocking=pin), y.to(device, non_blocking=pin)


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


def train_classifier(
    model: nn.Module,
    split: Split,
    options: TrainOptions,
    ctx: RunContext,
    *,
    tag: str = "train",
) -> nn.Module:
    """Train ``model`` in place on ``ctx.device`` with Adam and cross-entropy; return it.

    Every epoch visits each sample of ``split`` once, in the order of a permutation drawn from
    ``ctx.generator(f"{tag}-epoch-{e}")`` (``e`` counts from 1); the last batch may be smaller.
    With ``options.resident`` ``"always"`` (or ``"auto"`` when the split fits on the device), the
    split is moved to the device once and batches are slices of it; ``"never"`` reads batches
    through a ``torch.utils.data.DataLoader``. Both give the same weights.

    After each epoch one line goes to ``metrics.jsonl``: ``stage`` (= ``tag``), ``epoch``,
    ``loss`` (mean cross-entropy over the epoch's samples, as trained), ``train_accuracy``
    (share of the epoch's samples classified correctly at the moment they were trained on) and
    ``seconds``. The model is left in eval mode.
    """
    n = len(split)
    if n == 0:
        raise ValueError(f"train_classifier[{tag}]: the training split is empty")
    device = ctx.device
    model.to(device)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=options.lr, weight_decay=options.weight_decay, fused=_can_fuse(model, device)
    )

    if options.resident == "always":
        resident = True
    elif options.resident == "never":
        resident = False
    else:
        resident = fits_on_device(split, device)
    if resident:
        images = split.images.to(device)
        labels = split.labels.to(device)

    batch_size = options.batch_size
    steps = -(-n // batch_size)
    with _progress_bar(ctx.progress, f"{tag}", steps * options.epochs) as advance:
        for epoch in range(1, options.epochs + 1):
            order = torch.randperm(n, generator=ctx.generator(f"{tag}-epoch-{epoch}"))
            if resident:
                batches = _resident_batches(images, labels, order.to(device), batch_size)
            else:
                batches = _loader_batches(split, order, batch_size, device)
            model.train()
            started = time.perf_counter()
            # Summed on the device: one synchronisation per epoch, not one per batch.
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            for x, y in batches:
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach().double() * y.shape[0]
                correct += (logits.detach().argmax(dim=1) == y).sum()
                advance()
            mean_loss = float(loss_sum) / n
            accuracy = int(correct) / n
            seconds = time.perf_counter() - started
            if not np.isfinite(mean_loss):
                raise FloatingPointError(
                    f"train_classifier[{tag}]: loss is {mean_loss} after epoch {epoch} "
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
    model.eval()
    return model


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
