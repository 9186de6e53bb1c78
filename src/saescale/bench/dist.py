"""`saescale bench dist`: the same optimiser step (same weights, same global batch) run by one
process on all cores and by tp ranks (one core each, gloo), interleaved in one run, with the
bytes each rank sends per step. Also `--peak-memory` for one large tp run: per-rank peak RSS
against `saescale plan`'s prediction. Prints one JSON object.

Each TP rank loads its share of the batch and the group all-gathers it, as in training, so the
communication counted is everything a training step sends: that all-gather, the top-k
candidates, the partial reconstructions and the b_pre gradient.

`precision` and `micro_batches` go to every trainer (train.precision, train.micro_batches) and,
with --peak-memory, to the planner too, so measured and planned memory describe the same step.
Both default to fp32 and 1 (the numbers of earlier versions).
"""

from __future__ import annotations

import os
import resource
import statistics
import tempfile
import time
from typing import Any

import torch

MB = 2**20


def _setup(
    d_in: int, n_latents: int, k: int, batch: int, seed: int = 0, precision: str = "fp32", micro_batches: int = 1
):
    from saescale.core.config import NEVER, NEVER_DEAD, SAEConfig, TrainConfig

    sae_cfg = SAEConfig(d_in=d_in, n_latents=n_latents, k=k, normalization="none", dead_tokens_threshold=NEVER_DEAD)
    train_cfg = TrainConfig(
        log_every=NEVER, histogram_every=NEVER, seed=seed, precision=precision, micro_batches=micro_batches
    )
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, d_in, generator=g)
    return sae_cfg, train_cfg, x


def _time_steps(step, repeats: int, warmup: int, sync=None) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        step()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return times


def _spec_setup(spec: dict[str, Any]):
    return _setup(
        spec["d_in"],
        spec["n_latents"],
        spec["k"],
        spec["batch"],
        precision=spec.get("precision", "fp32"),
        micro_batches=spec.get("micro_batches", 1),
    )


def single_process_step(spec: dict[str, Any], threads: int) -> list[float]:
    from saescale.core.model import TopKSAE
    from saescale.train.trainer import Trainer

    torch.set_num_threads(threads)
    sae_cfg, train_cfg, x = _spec_setup(spec)
    trainer = Trainer(TopKSAE(sae_cfg), train_cfg)
    trainer.initialize(x)
    return _time_steps(lambda: trainer.train_step(x), spec["repeats"], spec["warmup"])


def _tp_worker(rank: int, world: int, port: int, spec: dict[str, Any], out: str) -> None:
    import json

    import torch.distributed as dist

    from saescale.distributed.mesh import ParallelDims
    from saescale.train.rank_setup import build_rank_trainer, local_share

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        sae_cfg, train_cfg, x = _spec_setup(spec)
        dims = ParallelDims(dp=1, tp=world)
        trainer = build_rank_trainer(sae_cfg, train_cfg, dims, rank)
        tp = trainer.tp
        trainer.initialize(x)
        mine = local_share(x, dims, rank).half()  # as loaded from an fp16 cache

        def step() -> None:
            trainer.train_step(tp.all_gather_rows(mine))

        for _ in range(spec["warmup"]):
            step()
        tp.stats.reset()
        times = _time_steps(step, spec["repeats"], 0, sync=dist.barrier)
        result = {
            "times": times,
            "bytes_per_step": tp.stats.bytes_sent / spec["repeats"],
            "comm_s_per_step": tp.stats.seconds / spec["repeats"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "precision": trainer.precision.name,
        }
        with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
            json.dump(result, handle)
    finally:
        dist.destroy_process_group()


def tp_step(spec: dict[str, Any], tp: int) -> list[dict[str, Any]]:
    import json

    import torch.multiprocessing as mp

    from saescale.net import free_port

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_tp_worker, args=(tp, free_port(), spec, out), nprocs=tp)
        return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(tp)]


def _spec(
    d_in: int, n_latents: int, k: int, batch: int, repeats: int, warmup: int, precision: str, micro_batches: int
) -> dict[str, Any]:
    """What every process of a dist bench builds its trainer from."""
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"--micro-batches must be a positive integer, got {micro_batches!r}")
    return {
        "d_in": d_in,
        "n_latents": n_latents,
        "k": k,
        "batch": batch,
        "repeats": repeats,
        "warmup": warmup,
        "precision": precision,
        "micro_batches": micro_batches,
    }


def bench_dist(
    d_in: int = 576,
    n_latents: int = 16384,
    k: int = 32,
    batch: int = 4096,
    tp: int = 2,
    threads: int = 2,
    repeats: int = 5,
    warmup: int = 2,
    rounds: int = 2,
    precision: str = "fp32",
    micro_batches: int = 1,
) -> dict[str, Any]:
    """Alternate single-process and tp rounds (the machine is noisy) and compare medians."""
    spec = _spec(d_in, n_latents, k, batch, repeats, warmup, precision, micro_batches)
    single, parallel, ranks = [], [], []
    for _ in range(rounds):
        single += single_process_step(spec, threads)
        ranks = tp_step(spec, tp)
        parallel += [max(ts) for ts in zip(*(r["times"] for r in ranks))]  # a step ends when its slowest rank does
    single_s, tp_s = statistics.median(single), statistics.median(parallel)
    return {
        "d_in": d_in,
        "n_latents": n_latents,
        "k": k,
        "batch": batch,
        "tp": tp,
        "precision": ranks[0]["precision"],
        "micro_batches": micro_batches,
        "single_threads": threads,
        "single_step_s": round(single_s, 4),
        "tp_step_s": round(tp_s, 4),
        "tp_over_single": round(tp_s / single_s, 3),
        "bytes_sent_per_step_per_rank": int(ranks[0]["bytes_per_step"]),
        "comm_s_per_step": round(ranks[0]["comm_s_per_step"], 4),
        "tokens_per_s_single": round(batch / single_s, 1),
        "tokens_per_s_tp": round(batch / tp_s, 1),
    }


def bench_peak_memory(
    d_in: int,
    n_latents: int,
    k: int,
    batch: int,
    tp: int,
    steps: int = 3,
    precision: str = "fp32",
    micro_batches: int = 1,
) -> dict[str, Any]:
    """Train `steps` steps at tp ranks; per-rank peak RSS against the planner's per-rank total
    for the same precision and micro-batches (planned first: a layout it rejects never runs)."""
    from saescale.distributed.plan import plan_memory
    from saescale.train.precision import resolve_precision

    resolved = resolve_precision(precision, torch.device("cpu"))  # the ranks run on CPU
    plan = plan_memory(n_latents, d_in, k, tp, tp, batch, micro_batches, precision=resolved)
    spec = _spec(d_in, n_latents, k, batch, steps, 0, precision, micro_batches)
    t0 = time.perf_counter()
    ranks = tp_step(spec, tp)
    peak = max(r["peak_rss_mb"] for r in ranks)
    return {
        "n_latents": n_latents,
        "d_in": d_in,
        "batch": batch,
        "tp": tp,
        "precision": resolved,
        "micro_batches": micro_batches,
        "steps": steps,
        "step_s": round(statistics.median(max(ts) for ts in zip(*(r["times"] for r in ranks))), 3),
        "peak_rss_mb_per_rank": round(peak, 1),
        "planned_mb_per_rank": round(plan.total / MB, 1),
        "peak_over_plan": round(peak * MB / plan.total, 3),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
