"""`saescale bench stream`: how many LM actors a training worker needs (`data.source=model`).

Measured in one run, on this machine: an LM actor's tokens/s (the model stream's own code,
`data.builder.window_rows`, on chunks of the embedded corpus, `--lm-threads` torch threads) and a
training worker's SAE tokens/s (`bench step`'s timed step at the worker's share of the batch,
`--worker-threads` threads). The pipeline overlaps the two, so a worker waits for data a
fraction max(0, 1 - actors x LM rate / SAE rate) of the time; the answer is the fewest actors
that keep that under `--max-wait` (the paper-scale case: LM replicas on their own devices; on
one CPU box both share the cores, so the measured run is slower than either rate says).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch


def lm_tokens_per_s(
    model: str, layer: int, hook: str, windows_per_batch: int, threads: int, chunks: int, dtype: str = "float16"
) -> dict[str, Any]:
    """Rows/s of one LM replica computing the stream's chunks (after one warm-up chunk)."""
    from saescale.data.builder import CacheConfig, make_plan, window_rows
    from saescale.data.model_stream import deal_chunks
    from saescale.lm.models import load_causal_lm

    torch.set_num_threads(threads)
    cfg = CacheConfig(
        model=model,
        corpus="embedded:shakespeare",
        output="",
        hook=hook,
        layer=layer,
        dtype=dtype,
        windows_per_batch=windows_per_batch,
        max_tokens=(chunks + 1) * windows_per_batch * 64,
    )
    lm = load_causal_lm(cfg.model)
    plan = make_plan(cfg, lm.tokenizer)
    dealt = deal_chunks(plan.n_windows, windows_per_batch, seed=0)
    times, rows = [], 0
    with torch.no_grad():
        window_rows(lm.model, cfg, plan, dealt[0], "warm-up")
        for chunk in dealt[1 : chunks + 1]:
            start = time.perf_counter()
            got = window_rows(lm.model, cfg, plan, chunk, "bench")
            times.append(time.perf_counter() - start)
            rows += len(got.rows)
    return {
        "d_model": lm.model.config.hidden_size,
        "tokens_per_s": round(rows / sum(times), 1),
        "chunk_s": [round(t, 4) for t in times],
    }


def data_wait(actors: int, lm_rate: float, sae_rate: float) -> float:
    """The steady-state fraction of a worker's time spent waiting for rows."""
    return max(0.0, 1.0 - actors * lm_rate / sae_rate)


def bench_stream(
    model: str,
    layer: int,
    hook: str,
    n_latents: int,
    k: int,
    batch_per_worker: int,
    lm_threads: int,
    worker_threads: int,
    windows_per_batch: int = 16,
    chunks: int = 4,
    max_wait: float = 0.05,
) -> dict[str, Any]:
    from saescale.bench.step import bench_step

    lm = lm_tokens_per_s(model, layer, hook, windows_per_batch, lm_threads, chunks)
    step = bench_step(
        d_in=lm["d_model"],
        n_latents=n_latents,
        k=k,
        batch=batch_per_worker,
        threads=worker_threads,
        naive=False,
        repeats=5,
    )
    lm_rate, sae_rate = lm["tokens_per_s"], step["tokens_per_s"]
    actors = max(1, math.ceil((1.0 - max_wait) * sae_rate / lm_rate))
    return {
        "bench": "stream",
        "config": {
            "model": model,
            "hook": f"{hook}.{layer}",
            "n_latents": n_latents,
            "k": k,
            "batch_per_worker": batch_per_worker,
            "lm_threads": lm_threads,
            "worker_threads": worker_threads,
            "windows_per_batch": windows_per_batch,
        },
        "lm_tokens_per_s_per_actor": lm_rate,
        "sae_tokens_per_s_per_worker": sae_rate,
        "lm_actors_per_worker": actors,  # the fewest that keep the data wait under max_wait
        "max_wait": max_wait,
        "predicted_data_wait": {str(a): round(data_wait(a, lm_rate, sae_rate), 3) for a in (1, 2, actors)},
        "lm_chunk_s": lm["chunk_s"],
        "sae_step_s": step["step_s"],
    }
