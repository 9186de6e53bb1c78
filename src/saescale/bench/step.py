"""`saescale bench step`: one full optimiser step (forward, backward, decoder normalisation, Adam)
against the floor (encoder GEMM + top-k alone) and a naive dense implementation, in one run.

The step runs in a child process of its own, so its peak RSS is its own; the floor is timed in
the same child, interleaved with the steps and into the step's own pre-activation buffer (so it
adds no memory); the naive step runs in another child. Dead latents (--dead-fraction) get a
bias of -2: they never reach the main top-k but keep a tail of positive pre-activations for
AuxK, as in a real run. Prints one JSON object.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from typing import Any

MB = 2**20


def run_worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "saescale.bench.step_worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker {spec['kind']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_model_bytes(d_in: int, n_latents: int, batch: int) -> int:
    """params + grads + Adam (2 moments) + one [batch, n] fp32 pre-activation + 300 MB."""
    params = 2 * n_latents * d_in + n_latents + d_in
    return 4 * (4 * params) + 4 * batch * n_latents + 300 * MB


def bench_step(
    d_in: int,
    n_latents: int,
    k: int,
    batch: int,
    auxk: bool = True,
    dead_fraction: float = 0.0,
    multi_topk: bool = False,
    naive: bool = True,
    threads: int = 2,
    warmup: int = 2,
    repeats: int = 7,
    aux_precision: str = "auto",
    timeout: float = 1800,
) -> dict[str, Any]:
    from saescale.core.config import SAEConfig

    SAEConfig(d_in=d_in, n_latents=n_latents, k=k, multi_topk=multi_topk)  # fail fast on bad sizes
    if not 0.0 <= dead_fraction < 1.0:
        raise ValueError(f"--dead-fraction must be in [0, 1), got {dead_fraction}")
    spec = dict(
        d_in=d_in,
        n_latents=n_latents,
        k=k,
        batch=batch,
        auxk=auxk,
        dead_fraction=dead_fraction,
        multi_topk=multi_topk,
        threads=threads,
        warmup=warmup,
        repeats=repeats,
        aux_precision=aux_precision,
    )
    step = run_worker({**spec, "kind": "step"}, timeout)
    result: dict[str, Any] = {
        "bench": "step",
        "config": spec,
        "step_s": round(step["median_s"], 4),
        "tokens_per_s": round(batch / step["median_s"], 1),
        "peak_rss_mb": round(step["peak_rss_bytes"] / MB, 1),
        "floor_s": round(step["floor_median_s"], 4),
        # median of per-pair ratios: each step is compared with the floor timed just before it
        "step_over_floor": round(statistics.median(s / f for s, f in zip(step["times_s"], step["floor_times_s"])), 3),
        "step_times_s": [round(t, 4) for t in step["times_s"]],
        "floor_times_s": [round(t, 4) for t in step["floor_times_s"]],
        "memory_model_mb": round(memory_model_bytes(d_in, n_latents, batch) / MB, 1),
    }
    result["peak_rss_over_model"] = round(result["peak_rss_mb"] / result["memory_model_mb"], 3)
    if naive:
        dense = run_worker({**spec, "kind": "naive", "repeats": max(2, repeats // 2)}, timeout)
        result["naive_s"] = round(dense["median_s"], 4)
        result["naive_over_step"] = round(dense["median_s"] / step["median_s"], 2)
        result["naive_peak_rss_mb"] = round(dense["peak_rss_bytes"] / MB, 1)
    return result
