"""Cost of one RRR training step against one plain cross-entropy step.

Baseline: an Adam step on the cross entropy of a batch of 72 (1x28x28) on an MLP 784-256-10.
Measured: an Adam step on ``rrr_loss`` for the same batch, 8 alignment samples with a mask
and 64 ordinary samples without (double backprop). Also shown, for reference: the RRR step
with input gradients taken for the whole batch (what ``rrr_loss`` avoids for mask-free rows).

Target: median RRR step <= 2.5x the median cross-entropy step. Exits 1 when missed.

    python benchmarks/bench_rrr.py [--steps 300]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lvlmva.plugins.aligners.rrr import rrr_loss

TARGET = 2.5


def build_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))


def rrr_loss_whole_batch(model, inputs, targets, masks, lam):
    """Reference: input gradients of every row of the batch (no skipping of empty masks)."""
    x = inputs.detach().clone().requires_grad_(True)
    logits = model(x)
    ce = F.cross_entropy(logits, targets)
    (grad,) = torch.autograd.grad(F.log_softmax(logits, dim=1).sum(), x, create_graph=True)
    penalty = (masks.unsqueeze(1).to(x.dtype) * grad).square().sum() / x.shape[0]
    return ce + lam * penalty, ce, penalty


def time_interleaved(
    steps: dict[str, Callable[[], None]], rounds: int, warmup: int = 20
) -> dict[str, float]:
    """Median seconds per call of each step function. The functions run in turn, one call each
    per round, so that load from other processes on the machine hits all of them alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="timed steps per variant")
    args = parser.parse_args()

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    inputs = torch.rand(72, 1, 28, 28, generator=gen) * 255
    targets = torch.randint(0, 10, (72,), generator=gen)
    masks = torch.zeros(72, 28, 28, dtype=torch.bool)
    masks[:8, :4, :4] = True  # 8 alignment samples with a decoy-sized mask, 64 ordinary ones

    def make_step(loss_fn):
        model = build_mlp()
        opt = torch.optim.Adam(model.parameters(), lr=1e-5)

        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn(model).backward()
            opt.step()

        return step

    ce_step = make_step(lambda m: F.cross_entropy(m(inputs), targets))
    rrr_step = make_step(lambda m: rrr_loss(m, inputs, targets, masks, 1.0)[0])
    whole_step = make_step(lambda m: rrr_loss_whole_batch(m, inputs, targets, masks, 1.0)[0])

    medians = time_interleaved(
        {"ce": ce_step, "rrr": rrr_step, "whole": whole_step}, rounds=args.steps
    )
    ce_s, rrr_s, whole_s = medians["ce"], medians["rrr"], medians["whole"]

    ratio = rrr_s / ce_s
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch 8+64, MLP 784-256-10"
    )
    print(f"baseline  cross-entropy step      : {ce_s * 1e6:9.1f} us")
    print(f"rrr_loss step (masked rows only)  : {rrr_s * 1e6:9.1f} us  ratio {ratio:.2f}x")
    print(
        f"rrr step, whole-batch input grads : {whole_s * 1e6:9.1f} us  ratio {whole_s / ce_s:.2f}x"
    )
    print(
        f"target: rrr_loss step <= {TARGET}x cross-entropy step -> {'met' if ratio <= TARGET else 'MISSED'}"
    )
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
