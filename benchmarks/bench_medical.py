"""Costs on the medical data path, each as a ratio against a named baseline, in one run.

1. PPEPS-WGM on one 224 x 224 attribution map against that map's DeepLiftShap attribution on
   ResNet-50 (target: at most 5 %).
2. DeepLiftShap on ResNet-50 against the raw forward and backward passes it needs: one forward
   and one backward pass of the model over the paired input x background batch, with input
   gradients (target: at most 1.3x; met by ``engine = "rescale"``: 1.20x on a 2-core CPU; Captum's engine is shown too).
3. An RRR step (double backprop, 8 masked + 56 ordinary samples) on ResNet-18 at 64 x 64
   against a cross-entropy step on the same batch (target: at most 3x).
4. The training data path: the trainer's epoch over a uint8 split normalised per batch (the
   compact storage of the medical providers) against the same number of steps on one resident
   float32 batch (target: at least 0.9 of its throughput).

5. Synthetic proxies: images drawn per second at 64 x 64 (target: at least 1,000 per second
   for each proxy) and, for reference, at 224 x 224.

Exits 1 when a target is missed. Each comparison runs both sides interleaved (A, B, A, B, ...)
and compares medians, so that load from other processes hits both alike.

    python benchmarks/bench_medical.py [--device cuda] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from lvlmva.plugins.aligners.rrr import rrr_loss
from lvlmva.plugins.attributors.deeplift_shap import (
    DeepLiftShapAttributor,
    prepare_model_for_deeplift,
)
from lvlmva.plugins.models.resnet import ResNetFactory
from lvlmva.plugins.segmenters.ppeps_wgm import PpepsWgmSegmenter
from lvlmva.protocols import RunContext
from lvlmva.records import Normalization, Split
from lvlmva.settings import TrainOptions
from lvlmva.training import Trainer


def medians(steps: dict[str, Callable[[], None]], rounds: int, warmup: int = 1) -> dict[str, float]:
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def resnet(depth: str, shape: tuple[int, int, int], device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return ResNetFactory(ResNetFactory.Options(depth=depth)).build(shape, 2).to(device).eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per comparison")
    parser.add_argument("--background", type=int, default=25, help="DeepLiftShap background samples (the paper: 25)")
    args = parser.parse_args()
    device = torch.device(args.device)
    results: list[tuple[str, float, str, bool]] = []
    tmp = Path(tempfile.mkdtemp())
    ctx = RunContext(seed=0, device=device, run_dir=tmp, stage_dir=tmp, cache_dir=tmp)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")

    # -- 1 and 2: DeepLiftShap on ResNet-50 at 224, PPEPS-WGM on its map, raw passes ---------------
    model50 = resnet("resnet50", (3, 224, 224), device)
    x = torch.randn(1, 3, 224, 224, generator=gen)
    pool = torch.randn(args.background, 3, 224, 224, generator=gen)
    target = torch.tensor([1])
    attributor = DeepLiftShapAttributor(DeepLiftShapAttributor.Options(background_size=args.background, engine="rescale"))
    with_captum = DeepLiftShapAttributor(DeepLiftShapAttributor.Options(background_size=args.background))
    maps: list[torch.Tensor] = []

    def attribute() -> None:
        maps.append(attributor.attribute(model50, x, target, pool, ctx))

    def attribute_captum() -> None:
        with_captum.attribute(model50, x, target, pool, ctx)

    prepared = prepare_model_for_deeplift(model50, example_input=x.to(device)).to(device).eval()
    for p in prepared.parameters():
        p.requires_grad_(False)

    def raw_passes() -> None:
        # what DeepLiftShap must at least do: one forward and one backward over the input
        # repeated against every background sample, with gradients on the inputs
        batch = torch.cat([x.expand(args.background, -1, -1, -1), pool]).to(device).requires_grad_(True)
        out = prepared(batch)[:, 1].sum()
        torch.autograd.grad(out, batch)

    segmenter = PpepsWgmSegmenter(PpepsWgmSegmenter.Options(num_clusters=7))
    attribute()
    one_map = maps[-1]

    def segment() -> None:
        segmenter.segment(one_map, ctx)

    t = medians({"attribute": attribute, "captum": attribute_captum, "raw": raw_passes, "segment": segment}, args.rounds)
    r1 = t["segment"] / t["attribute"]
    results.append(("PPEPS-WGM (J=7) on a 224x224 map / its DeepLiftShap (rescale engine) on ResNet-50", r1, "<= 0.05", r1 <= 0.05))
    r2 = t["attribute"] / t["raw"]
    results.append((f"DeepLiftShap, rescale engine, ResNet-50 224x224 (background {args.background}) / raw forward+backward", r2, "<= 1.3", r2 <= 1.3))
    print(
        f"  DeepLiftShap rescale engine {t['attribute'] * 1e3:.0f} ms, Captum engine {t['captum'] * 1e3:.0f} ms "
        f"({t['captum'] / t['raw']:.2f}x the raw passes), raw passes {t['raw'] * 1e3:.0f} ms, PPEPS-WGM {t['segment'] * 1e3:.1f} ms"
    )

    # -- 3: RRR step on ResNet-18 at 64 --------------------------------------------------------
    model18 = resnet("resnet18", (3, 64, 64), device).train()
    inputs = torch.randn(64, 3, 64, 64, generator=gen).to(device)
    labels = torch.randint(0, 2, (64,), generator=gen).to(device)
    masks = torch.zeros(64, 64, 64, dtype=torch.bool)
    masks[:8, :16, :16] = True
    masks = masks.to(device)
    opt = torch.optim.Adam(model18.parameters(), lr=1e-4)

    def ce_step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model18(inputs), labels).backward()
        opt.step()

    def rrr_step() -> None:
        opt.zero_grad(set_to_none=True)
        rrr_loss(model18, inputs, labels, masks, 10.0)[0].backward()
        opt.step()

    t = medians({"ce": ce_step, "rrr": rrr_step}, max(args.rounds, 5) * 2)
    r3 = t["rrr"] / t["ce"]
    results.append(("RRR step ResNet-18 64x64, 8+56 / cross-entropy step", r3, "<= 3.0", r3 <= 3.0))
    print(f"  cross-entropy step {t['ce'] * 1e3:.0f} ms, RRR step {t['rrr'] * 1e3:.0f} ms")

    # -- 4: the training data path on uint8 storage ---------------------------------------------
    n, batch_size = 1024, 64
    pixels = torch.randint(0, 256, (n, 3, 64, 64), generator=gen, dtype=torch.uint8)
    split = Split(images=pixels, labels=torch.randint(0, 2, (n,), generator=gen), normalization=Normalization((0.5,) * 3, (0.25,) * 3, 1 / 255))
    small = ResNetFactory(ResNetFactory.Options(depth="resnet18"))
    trainer = Trainer(lambda: small.build((3, 64, 64), 2), TrainOptions(epochs=1, lr=1e-4, batch_size=batch_size), ctx)
    model = trainer.new_model().to(device)
    resident_x = split.inputs[torch.arange(batch_size)].to(device)
    resident_y = split.labels[:batch_size].to(device)
    opt4 = torch.optim.Adam(model.parameters(), lr=1e-4)
    steps = n // batch_size

    def epoch_path() -> None:
        trainer.fit(split, model, tag="bench")

    def one_batch() -> None:
        for _ in range(steps):
            opt4.zero_grad(set_to_none=True)
            F.cross_entropy(model(resident_x), resident_y).backward()
            opt4.step()

    t = medians({"path": epoch_path, "resident": one_batch}, args.rounds)
    r4 = t["resident"] / t["path"]
    results.append((f"training data path (uint8, {n} images, batch {batch_size}) throughput / one resident batch", r4, ">= 0.9", r4 >= 0.9))
    print(f"  epoch through the data path {t['path']:.2f} s, same steps on one resident batch {t['resident']:.2f} s")

    # -- 5: synthetic generation rate ----------------------------------------------------------
    from lvlmva.datasets.synthetic import draw_knee, draw_skin

    for draw, name in ((draw_skin, "skin"), (draw_knee, "knee")):
        rates = {}
        for size, count in ((64, 1024), (224, 128)):
            labels = torch.arange(count) % 2
            flags = (torch.arange(count) // 2) % 2 == 1
            draw(labels[:8], flags[:8], size, torch.Generator().manual_seed(0))  # warm-up
            best = min(
                _timed(lambda: draw(labels, flags, size, torch.Generator().manual_seed(1))) for _ in range(3)  # noqa: B023
            )
            rates[size] = count / best
        print(f"  synthetic-{name}: {rates[64]:.0f} images/s at 64 x 64, {rates[224]:.0f} at 224 x 224")
        results.append((f"synthetic-{name} images per second at 64 x 64", rates[64], ">= 1000", rates[64] >= 1000))

    print()
    for name, ratio, target, ok in results:
        print(f"{name}: {ratio:.3f}  (target {target}) -> {'met' if ok else 'MISSED'}" if ratio < 100 else f"{name}: {ratio:.0f}  (target {target}) -> {'met' if ok else 'MISSED'}")
    return 0 if all(ok for *_, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
