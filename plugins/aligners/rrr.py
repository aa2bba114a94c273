"""Right-for-the-Right-Reasons alignment (Ross et al. 2017).

The loss, for a batch of ``B`` samples with binary correction masks ``A`` (``A = 0`` for
ordinary samples)::

    L = CE + lam * penalty
    CE      = mean_n  cross_entropy(f(x_n), y_n)
    penalty = mean_n  sum_{c,i} (A_ni * d/dx_nci sum_k log_softmax(f(x_n))_k)^2

Reduction: the penalty is summed over channels and pixels and averaged over the *whole* batch,
ordinary samples included (they contribute 0 but count in the mean), exactly like the cross
entropy. With 8 alignment + 64 ordinary samples per step the penalty is therefore 8/72 of the
mean penalty of the alignment samples; ``lam`` values from other code bases that sum over the
batch must be divided by the batch size to compare. ``gamma`` (L2 on the weights) is 0 in the
method; the option ``weight_decay`` gives Adam's decoupled-from-the-loss equivalent when wanted.

The input gradients use plain ``torch.autograd.grad(..., create_graph=True)`` (double
backprop), never captum: the penalty must stay differentiable with respect to the parameters.

``lam`` may be a grid: one model is aligned per value, each from the same input model with the
same seeded batches, and the one with the best validation score (``select_by``) is returned as
a :class:`~lvlmva.records.TrainedModel` whose details list every point's scores. The test split
is never read.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from lvlmva.metrics import accuracy, average_group_accuracy, worst_group_accuracy
from lvlmva.protocols import PluginOptions, RunContext
from lvlmva.records import AlignmentSet, SpuriousDataset, TrainedModel
from lvlmva.training import predict_logits

__all__ = ["rrr_loss", "RrrAligner", "RrrOptions"]


def _has_batch_coupling(model: nn.Module) -> bool:
    """True when a layer mixes samples of a batch (batch norm using batch statistics): the
    batch may then not be split into separately forwarded parts without changing the loss."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()
    )


def rrr_loss(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    masks: torch.Tensor,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The RRR loss of one batch: returns ``(total, ce, penalty)`` with ``total = ce + lam *
    penalty`` (see the module docstring for the reductions: both terms are means over the batch).

    - ``inputs``: float ``[B, C, H, W]``; ``targets``: int64 ``[B]``.
    - ``masks``: ``[B, H, W]`` (broadcast over channels) or ``[B, C, H, W]``, bool or float;
      non-zero = "the model must not use this pixel".

    Input gradients are computed only for samples whose mask is non-empty; the cross entropy
    covers all samples. For models that treat samples independently this is the same number as
    differentiating the whole batch (the penalty of an all-zero mask is 0), at a fraction of the
    double-backprop cost. Models with batch statistics in training mode (batch norm) are
    forwarded as one batch so that the statistics are those of the whole batch.
    """
    if inputs.dim() != 4:
        raise ValueError(f"rrr_loss: inputs must be [B,C,H,W], got {tuple(inputs.shape)}")
    b = inputs.shape[0]
    if masks.dim() == 3:
        masks = masks.unsqueeze(1)
    if masks.dim() != 4 or masks.shape[0] != b or masks.shape[2:] != inputs.shape[2:]:
        raise ValueError(
            f"rrr_loss: masks must be [B,H,W] or [B,C,H,W] matching inputs {tuple(inputs.shape)}, "
            f"got {tuple(masks.shape)}"
        )
    if masks.shape[1] not in (1, inputs.shape[1]):
        raise ValueError(
            f"rrr_loss: mask channels {masks.shape[1]} do not broadcast to {inputs.shape[1]}"
        )
    if tuple(targets.shape) != (b,):
        raise ValueError(f"rrr_loss: targets must be [{b}], got {tuple(targets.shape)}")
    masked = masks.flatten(1).any(dim=1)
    weights = masks.to(inputs.dtype)
    inputs = inputs.detach()

    if _has_batch_coupling(model):
        x = inputs.clone().requires_grad_(True)
        logits = model(x)
        ce = F.cross_entropy(logits, targets)
        (grad,) = torch.autograd.grad(F.log_softmax(logits, dim=1).sum(), x, create_graph=True)
        penalty = (weights * grad).square().sum() / b
        return ce + lam * penalty, ce, penalty

    sel = masked.nonzero().squeeze(1)
    rest = (~masked).nonzero().squeeze(1)
    ce_sum = inputs.new_zeros(())
    penalty_sum = inputs.new_zeros(())
    if sel.numel():
        x = inputs[sel].requires_grad_(True)
        logits = model(x)
        ce_sum = F.cross_entropy(logits, targets[sel], reduction="sum")
        # Sum over samples and classes: each sample's input gradient only sees its own outputs.
        (grad,) = torch.autograd.grad(F.log_softmax(logits, dim=1).sum(), x, create_graph=True)
        penalty_sum = (weights[sel] * grad).square().sum()
    if rest.numel():
        ce_sum = ce_sum + F.cross_entropy(model(inputs[rest]), targets[rest], reduction="sum")
    ce = ce_sum / b
    penalty = penalty_sum / b
    return ce + lam * penalty, ce, penalty


class RrrOptions(PluginOptions):
    """Options of the RRR aligner."""

    lam: float | tuple[float, ...] = Field(
        1e4,
        description="lambda: weight of the input-gradient penalty (penalty = sum over pixels, mean "
        "over the batch of alignment + ordinary samples). Its scale goes with the input scale: "
        "the penalty on 0-255 inputs is 255^2 times smaller than on 0-1 inputs. The default suits "
        "DecoyMNIST on the 0-255 scale with the quick settings (lr 1e-3, 3 epochs); on 0-1 "
        "inputs about 1 is the equivalent. A list (e.g. [1, 10, 100, 1e3, 1e4, 1e5]) is a grid: "
        "one model is aligned per value (k values cost k alignments), each from the same model "
        "with the same seeded batches, and the best by select_by on the validation split is "
        "kept (ties: the first value); a grid needs a validation split.",
    )
    select_by: Literal["val-accuracy", "val-wga"] = Field(
        "val-accuracy",
        description="How a lam grid is decided: 'val-accuracy' (validation accuracy; needs no "
        "group labels) or 'val-wga' (worst-group validation accuracy; needs group labels on the "
        "validation split). Unused for a single lam. The test split is never read.",
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

    @field_validator("lam")
    @classmethod
    def _lam_is_non_negative(cls, value: float | tuple[float, ...]) -> float | tuple[float, ...]:
        # A validator rather than Annotated bounds, so the settings reference shows a plain type.
        values = value if isinstance(value, tuple) else (value,)
        if not values:
            raise ValueError("lam: a grid needs at least one value")
        if not all(v >= 0 for v in values):  # NaN fails too
            raise ValueError(f"lam must be >= 0 (each value of a grid), got {value}")
        return value


class RrrAligner:
    """Fine-tunes a copy of the model with the Right-for-the-Right-Reasons loss (Ross et al. 2017).

    Each step takes ``alignment_batch`` alignment samples with their masks (a seeded permutation
    of the alignment set, repeated as needed) and ``ordinary_batch`` training samples with an
    empty mask (a seeded permutation of the whole training split per epoch; an epoch is one pass
    over it). Tensors stay resident; batches move to ``ctx.device`` per step. The returned model
    is a new module in eval mode; the input model is left unchanged. A ``lam`` grid aligns one
    model per value and returns the best on the validation split as a ``TrainedModel``.
    """

    Options: ClassVar[type[PluginOptions]] = RrrOptions
    needs_masks: ClassVar[bool] = True

    def __init__(self, options: RrrOptions) -> None:
        self.options = options

    def check_data(self, data: SpuriousDataset) -> list[str]:
        """What would stop a lam grid: no (or an empty) validation split, or ``val-wga``
        without validation group labels. A single lam needs neither."""
        opts = self.options
        if not isinstance(opts.lam, tuple):
            return []
        grid = f"lam is a grid of {len(opts.lam)} values"
        if data.val is None or len(data.val) == 0:
            return [
                f"{grid}, chosen on the validation split, but the data set has "
                f"{'no' if data.val is None else 'an empty'} validation split: add one or give "
                "lam a single value"
            ]
        if opts.select_by == "val-wga" and data.val.groups is None:
            return [
                f"select_by = 'val-wga' (for the {grid}) needs group labels on the validation "
                "split, which has none: use select_by = 'val-accuracy' or a data set with groups"
            ]
        return []

    def align(
        self,
        model: nn.Module,
        data: SpuriousDataset,
        alignment: AlignmentSet,
        masks: torch.Tensor,
        ctx: RunContext,
    ) -> nn.Module | TrainedModel:
        """The aligned model for a single lam; for a grid, the best one by ``select_by`` as a
        ``TrainedModel`` with the details of the choice."""
        problems = self.check_data(data)
        if problems:
            raise ValueError("RrrAligner: " + "; ".join(problems))
        opts = self.options
        n_align = len(alignment)
        if n_align == 0:
            raise ValueError("RrrAligner: the alignment set is empty (no sample has a valid mask)")
        spatial = tuple(data.train.images.shape[2:])
        if masks.dim() != 3 or masks.shape[0] != n_align or tuple(masks.shape[1:]) != spatial:
            raise ValueError(
                f"RrrAligner: masks must be [{n_align},{spatial[0]},{spatial[1]}] for the "
                f"alignment set, got {tuple(masks.shape)}"
            )
        if opts.ordinary_batch > 0 and len(data.train) == 0:
            raise ValueError("RrrAligner: the training split is empty")
        if not isinstance(opts.lam, tuple):
            return self._fit(model, data, alignment, masks, ctx, opts.lam, grid=False)

        key = "val_wga" if opts.select_by == "val-wga" else "val_accuracy"
        rows: list[dict[str, Any]] = []
        best: tuple[nn.Module, float, float] | None = None
        for lam in opts.lam:
            aligned = self._fit(model, data, alignment, masks, ctx, lam, grid=True)
            scores = _validation_scores(aligned, data, ctx)
            rows.append({"lam": lam, **scores})
            ctx.log_jsonl("metrics.jsonl", {"stage": "align-select", "lam": lam, **scores})
            # Strictly better only: a tie keeps the earlier grid value. Only the best so far is
            # kept, so the k models never need to fit in memory at once.
            if best is None or scores[key] > best[1]:
                best = (aligned, scores[key], lam)
        assert best is not None  # the grid has at least one value
        details = {"criterion": opts.select_by, "grid": rows, "chosen": {"lam": best[2]}}
        return TrainedModel(best[0], details)

    def _fit(
        self,
        model: nn.Module,
        data: SpuriousDataset,
        alignment: AlignmentSet,
        masks: torch.Tensor,
        ctx: RunContext,
        lam: float,
        grid: bool,
    ) -> nn.Module:
        """One alignment with ``lam``. Every call draws the same seeded batches (the generator
        salts do not depend on ``lam``), so grid points differ by lambda alone."""
        opts = self.options
        n_align = len(alignment)
        spatial = tuple(data.train.images.shape[2:])
        train = data.train
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
        align_gen = ctx.generator("rrr-alignment-order")
        align_stream = _CyclingPermutation(n_align, align_gen)

        if opts.ordinary_batch > 0:
            steps = math.ceil(n_train / opts.ordinary_batch)
        else:
            steps = math.ceil(n_align / opts.alignment_batch)
        if opts.max_steps_per_epoch is not None:
            steps = min(steps, opts.max_steps_per_epoch)
        # Grid points' lines are told apart by lam; a single lam logs exactly as before.
        tagged = {"lam": lam} if grid else {}
        label = f"align (RRR, lam {lam:g})" if grid else "align (RRR)"

        # Dropout and other stochastic layers draw from the global generator: seed it from the
        # run and restore it afterwards so that aligning does not shift other stages' numbers.
        cuda_devices = [device] if device.type == "cuda" else []
        with (
            torch.random.fork_rng(devices=cuda_devices),
            _progress(ctx, opts.epochs * steps, label) as advance,
        ):
            torch.manual_seed(ctx.generator("rrr-stochastic-layers").initial_seed())
            for epoch in range(opts.epochs):
                start = time.perf_counter()
                order = torch.randperm(n_train, generator=ctx.generator(f"rrr-epoch-{epoch}"))
                totals = torch.zeros(3, dtype=torch.float64)
                for step in range(steps):
                    a_idx = align_stream.take(opts.alignment_batch)
                    o_idx = order[step * opts.ordinary_batch : (step + 1) * opts.ordinary_batch]
                    inputs = torch.cat([align_images[a_idx], train.inputs[o_idx]]).to(device)
                    targets = torch.cat([align_labels[a_idx], train.labels[o_idx]]).to(device)
                    batch_masks = torch.cat(
                        [align_masks[a_idx], ordinary_masks[: o_idx.numel()]]
                    ).to(device)
                    total, ce, penalty = rrr_loss(aligned, inputs, targets, batch_masks, lam)
                    if not torch.isfinite(total):
                        raise FloatingPointError(
                            f"RrrAligner: loss became {total.item()} at epoch {epoch} step {step} "
                            f"(ce {ce.item()}, penalty {penalty.item()}, lam {lam:g}); lower lam "
                            "or lr"
                        )
                    optimiser.zero_grad(set_to_none=True)
                    total.backward()
                    if opts.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(aligned.parameters(), opts.max_grad_norm)
                    optimiser.step()
                    totals += (
                        torch.stack([total.detach(), ce.detach(), penalty.detach()]).double().cpu()
                    )
                    advance()
                means = (totals / max(steps, 1)).tolist()
                ctx.log_jsonl(
                    "metrics.jsonl",
                    {
                        "stage": "align",
                        "epoch": epoch + 1,  # counted from 1, as the trainer counts
                        **tagged,
                        "loss": means[0],
                        "ce": means[1],
                        "penalty": means[2],
                        "steps": steps,
                        "seconds": time.perf_counter() - start,
                    },
                )
        aligned.eval()
        return aligned


def _validation_scores(model: nn.Module, data: SpuriousDataset, ctx: RunContext) -> dict[str, Any]:
    """Accuracy, WGA and AGA of ``model`` on the validation split (group scores None without
    group labels)."""
    val = data.val
    assert val is not None  # check_data refused a grid without one
    logits = predict_logits(model, val.inputs, ctx.device)
    scores: dict[str, Any] = {
        "val_accuracy": accuracy(logits, val.labels),
        "val_wga": None,
        "val_aga": None,
    }
    if val.groups is not None:
        num_groups = len(data.group_names) or int(val.groups.max()) + 1
        scores["val_wga"] = worst_group_accuracy(logits, val.labels, val.groups, num_groups)
        scores["val_aga"] = average_group_accuracy(logits, val.labels, val.groups, num_groups)
    return scores


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


@contextlib.contextmanager
def _progress(ctx: RunContext, total: int, label: str) -> Iterator[Callable[[], None]]:
    """Yields a function that advances a rich progress bar over ``total`` steps when
    ``ctx.progress``, and does nothing otherwise."""
    if not ctx.progress:
        yield lambda: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda: progress.advance(task)
