"""LVLM stage throughput: critic + judge for 64 samples against a local OpenAI-compatible server
with a fixed 0.5 s latency, concurrency 16.

Baseline: the ideal schedule, ceil(calls / concurrency) * latency (every wave of requests in
flight at once). Target: the measured time within 1.5x of it, and a second run (same settings,
same cache) that makes zero requests.

    python benchmarks/bench_lvlm.py
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from lvlmva.plugins.lvlm.openai_backend import OpenAICritic, OpenAIJudge
from lvlmva.protocols import RunContext
from lvlmva.testing.openai_server import ScriptedOpenAIServer, synthetic_requests

SAMPLES = 64
CONCURRENCY = 16
LATENCY_S = 0.5
TARGET_RATIO = 1.5


def run_stage(
    server: ScriptedOpenAIServer, ctx: RunContext, samples: int = SAMPLES
) -> tuple[float, int, int, list[str]]:
    options = dict(
        base_url=server.base_url, api_key_env="", concurrency=CONCURRENCY, timeout_s=30.0
    )
    critic = OpenAICritic(OpenAICritic.Options(**options))
    judge = OpenAIJudge(OpenAIJudge.Options(**options))
    requests = synthetic_requests(samples, seed=ctx.seed)
    before = server.count
    start = time.perf_counter()
    verdicts = judge.judge(critic.critique(requests, ctx), ctx)
    elapsed = time.perf_counter() - start
    # what the server saw: critic requests carry the images, judge requests the critique
    bodies = [json.dumps(r.body, sort_keys=True) for r in server.requests[before:]]
    return elapsed, server.count - before, sum(v.ok for v in verdicts), bodies


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp, ScriptedOpenAIServer(latency_s=LATENCY_S) as server:
        run_dir = Path(tmp)
        ctx = RunContext(
            seed=0,
            device=torch.device("cpu"),
            run_dir=run_dir,
            stage_dir=run_dir,
            cache_dir=run_dir / "cache",
        )
        # Warm-up on a separate cache: the one-time cost of importing the HTTP client and
        # opening the cache is not what this benchmark measures.
        warm = RunContext(
            seed=1,
            device=ctx.device,
            run_dir=run_dir,
            stage_dir=run_dir,
            cache_dir=run_dir / "warm",
        )
        run_stage(server, warm, samples=CONCURRENCY)
        elapsed, calls, ok, bodies = run_stage(server, ctx)
        ideal = math.ceil(calls / CONCURRENCY) * LATENCY_S
        ratio = elapsed / ideal
        again, calls_again, ok_again, _ = run_stage(server, ctx)

    print(
        f"LVLM stage: {SAMPLES} samples, critic + judge, concurrency {CONCURRENCY}, latency {LATENCY_S} s"
    )
    print(f"  first run : {calls} requests in {elapsed:.2f} s, {ok}/{SAMPLES} judged")
    print(
        f"  baseline  : ideal schedule ceil({calls}/{CONCURRENCY}) * {LATENCY_S} s = {ideal:.2f} s"
    )
    print(f"  ratio     : {ratio:.2f}x the ideal schedule (target <= {TARGET_RATIO}x)")
    print(
        f"  second run: {calls_again} requests in {again:.2f} s, {ok_again}/{SAMPLES} judged (target 0 requests)"
    )
    missed = []
    if ratio > TARGET_RATIO:
        missed.append(f"ratio {ratio:.2f} > {TARGET_RATIO}")
    if calls_again != 0:
        missed.append(f"second run made {calls_again} requests")
    critic_calls = sum("image_url" in b for b in bodies)
    judge_bodies = [b for b in bodies if "image_url" not in b]
    # one critic request per sample; one judge request per distinct critique (two critiques
    # that read alike are judged once)
    if critic_calls != SAMPLES or len(judge_bodies) != len(set(judge_bodies)) or ok != SAMPLES or ok_again != SAMPLES:
        missed.append(
            f"expected {SAMPLES} critic requests, no judge request twice and {SAMPLES} judged samples "
            f"(got {critic_calls} critic, {len(judge_bodies)} judge with {len(set(judge_bodies))} distinct, {ok} judged)"
        )
    if missed:
        print("MISSED: " + "; ".join(missed))
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
