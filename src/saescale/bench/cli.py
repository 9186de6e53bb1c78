"""`saescale bench step|kernels|cache|dist|precision|recovery|soak|checkpoint|latents`: the benchmarks' parsers and bodies.

Each body imports its benchmark (torch, the trainer, Ray's job code) only when it runs, so that
`saescale --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def positive_int(value: str) -> int:
    """A positive integer (argparse type)."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}")
    return number


def _step(args: argparse.Namespace) -> int:
    from saescale.bench.step import bench_step

    result = bench_step(
        d_in=args.d_in,
        n_latents=args.n_latents,
        k=args.k,
        batch=args.batch,
        auxk=not args.no_auxk,
        dead_fraction=args.dead_fraction,
        multi_topk=args.multi_topk,
        naive=not args.no_naive,
        threads=args.threads,
        warmup=args.warmup,
        repeats=args.repeats,
        aux_precision=args.aux_precision,
        precision=args.precision,
        micro_batches=args.micro_batches,
        device=args.device,
        architecture=args.architecture,
        l1_coef=args.l1_coef,
        peers=tuple(p for p in (args.peers or "").split(",") if p),
        sync_free=args.sync_free,
        kernels=args.kernels,
        cuda_graphs=args.cuda_graphs,
    )
    print(json.dumps(result))
    return 0


def _kernels(args: argparse.Namespace) -> int:
    from saescale.bench.kernels import bench_kernels

    result = bench_kernels(
        d_in=args.d_in,
        n_latents=args.n_latents,
        k=args.k,
        batch=args.batch,
        device=args.device,
        dtype=args.dtype,
        repeats=args.repeats,
        warmup=args.warmup,
    )
    print(json.dumps(result))
    return 0


def _cache(args: argparse.Namespace) -> int:
    from saescale.bench.cache import bench_cache

    print(
        json.dumps(
            bench_cache(
                args.d_model,
                args.shards,
                args.rows_per_shard,
                args.batch,
                args.writer_tokens,
                args.s3_endpoint,
                args.skip_writer,
            )
        )
    )
    return 0


def _recovery(args: argparse.Namespace) -> int:
    from saescale.bench.recovery import bench_recovery

    print(json.dumps(bench_recovery(auxk=not args.no_auxk, transpose_init=not args.no_transpose_init, seed=args.seed)))
    return 0


def _precision(args: argparse.Namespace) -> int:
    from saescale.bench.precision import Setting, bench_precision

    setting = Setting(
        d_in=args.d_in,
        n_latents=args.n_latents,
        k=args.k,
        batch=args.batch,
        steps=args.steps,
        n_atoms=args.n_atoms,
        active=args.active,
        lr=args.lr,
        dead_steps=args.dead_steps,
        micro_batches=args.micro_batches,
        seed=args.seed,
    )
    print(json.dumps(bench_precision(tuple(args.precision), setting, args.device, args.threads)))
    return 0


def _dist(args: argparse.Namespace) -> int:
    from saescale.bench.dist import bench_dist, bench_peak_memory

    if args.peak_memory:
        result = bench_peak_memory(
            args.d_in, args.n_latents, args.k, args.batch, args.tp, args.repeats, args.precision, args.micro_batches
        )
    else:
        result = bench_dist(
            args.d_in,
            args.n_latents,
            args.k,
            args.batch,
            args.tp,
            args.threads,
            args.repeats,
            args.warmup,
            args.rounds,
            args.precision,
            args.micro_batches,
        )
    print(json.dumps(result))
    return 0


def _soak(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from saescale.app.schema import DEFAULT_CACHE
    from saescale.bench.soak import bench_soak

    result = bench_soak(
        args.cache or OmegaConf.create({"cache": DEFAULT_CACHE}).cache,  # resolves $SAESCALE_RUNS
        args.project,
        args.overrides,
        schedule=args.schedule,
        minutes=args.minutes,
        fault_every_s=args.fault_every_s,
        max_outage_s=args.max_outage_s,
        kill_every_s=args.kill_every_s,
        preempt_every_s=args.preempt_every_s,
        node_kill_every_s=args.node_kill_every_s,
        node_down_s=args.node_down_s,
        nodes=args.nodes,
        outage_s=args.outage_s,
        retry_s=args.retry_s,
        max_failures=args.max_failures,
        seed=args.seed,
        out=args.out,
    )
    print(json.dumps(result))
    # the faulted run ended as the uninterrupted one did (and, for `random`, lasted --minutes)
    return 0 if result.get("matches") and result.get("long_enough", True) else 1


def _checkpoint(args: argparse.Namespace) -> int:
    from saescale.bench.checkpoint import bench_checkpoint

    result = bench_checkpoint(args.d_in, args.n_latents, args.k, args.batch, args.steps, args.threads, args.folder)
    print(json.dumps(result))
    return 0


def _latents(args: argparse.Namespace) -> int:
    import tempfile

    from saescale.bench.latents import bench_latents

    result = bench_latents(
        args.project,
        args.out or tempfile.mkdtemp(prefix="saescale-latents-"),
        log2_latents=args.log2_latents,
        d_model=args.d_model,
        k=args.k,
        workers=args.workers,
        tp=args.tp,
        batch=args.batch,
        steps=args.steps,
        checkpoint_every=args.checkpoint_every,
        max_tokens=args.max_tokens,
        memory_per_worker_gib=args.memory_per_worker_gib,
    )
    print(json.dumps(result))
    return 0


def _stream(args: argparse.Namespace) -> int:
    from saescale.bench.stream import bench_stream

    result = bench_stream(
        args.model,
        args.layer,
        args.hook,
        args.n_latents,
        args.k,
        args.batch_per_worker,
        args.lm_threads,
        args.worker_threads,
        windows_per_batch=args.windows_per_batch,
        chunks=args.chunks,
        max_wait=args.max_wait,
    )
    print(json.dumps(result))
    return 0


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Register `bench` and its subcommands (in the order `saescale bench --help` lists them)."""
    bench = sub.add_parser("bench", help="benchmarks that print JSON")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    for add in (
        _add_step,
        _add_cache,
        _add_dist,
        _add_precision,
        _add_recovery,
        _add_soak,
        _add_checkpoint,
        _add_latents,
        _add_stream,
    ):
        add(bench_sub)


def _add_step(bench_sub: argparse._SubParsersAction[Any]) -> None:
    step = bench_sub.add_parser("step", help="time one optimiser step against the GEMM+top-k floor and a naive step")
    step.add_argument("--d-in", type=int, default=576)
    step.add_argument("--n-latents", type=int, default=16384)
    step.add_argument("--k", type=int, default=32)
    step.add_argument("--batch", type=int, default=4096)
    step.add_argument("--dead-fraction", type=float, default=0.0, help="fraction of latents marked dead (AuxK work)")
    step.add_argument("--no-auxk", action="store_true", help="disable the AuxK loss")
    step.add_argument("--multi-topk", action="store_true")
    step.add_argument("--no-naive", action="store_true", help="skip the dense baseline (for large n)")
    step.add_argument("--threads", type=int, default=2)
    step.add_argument("--warmup", type=int, default=2)
    step.add_argument("--repeats", type=int, default=7)
    step.add_argument("--aux-precision", choices=["auto", "float32", "bfloat16"], default="auto")
    step.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="fp32",
        help="the step's compute dtype (train.precision); default fp32, so numbers stay comparable "
        "with earlier runs (auto = bf16 where the hardware multiplies it natively)",
    )
    step.add_argument(
        "--micro-batches",
        type=positive_int,
        default=1,
        help="row chunks of the GEMM + top-k (train.micro_batches); default 1, the whole batch at once",
    )
    step.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where every tensor lives")
    step.add_argument(
        "--architecture",
        choices=["topk", "batchtopk", "relu"],
        default="topk",
        help="sae.architecture; the floor stays the GEMM + top-k, the same work for each",
    )
    step.add_argument("--l1-coef", type=float, default=0.01, help="ReLU's L1 coefficient (--architecture relu)")
    step.add_argument(
        "--sync-free",
        choices=["auto", "on", "off"],
        default="auto",
        help="train.sync_free: a step with no host synchronisation (auto: on for a CUDA TopK step); "
        "the result counts the host-synchronising ops of one step either way",
    )
    step.add_argument(
        "--kernels",
        choices=["auto", "torch", "triton"],
        default="auto",
        help="train.sparse_kernels: the TopK code's sparse products (triton: CUDA, the `kernels` extra)",
    )
    step.add_argument(
        "--cuda-graphs",
        choices=["auto", "on", "off"],
        default="off",
        help="train.cuda_graphs: the sync-free step compiled as one graph (CUDA graphs on a GPU); "
        "default off, the eager step, so each variant is asked for by name",
    )
    step.add_argument(
        "--peers", default=None, help="comma-separated peers whose own step is timed beside ours: sparsify"
    )
    step.set_defaults(func=_step)


def _add_cache(bench_sub: argparse._SubParsersAction[Any]) -> None:
    kern = bench_sub.add_parser(
        "kernels", help="each sparse product of the TopK step: embedding_bag against Triton (CUDA), same tensors"
    )
    kern.add_argument("--d-in", type=positive_int, default=576)
    kern.add_argument("--n-latents", type=positive_int, default=65536)
    kern.add_argument("--k", type=positive_int, default=32)
    kern.add_argument("--batch", type=positive_int, default=4096)
    kern.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    kern.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights and dense factors")
    kern.add_argument("--repeats", type=positive_int, default=20)
    kern.add_argument("--warmup", type=int, default=3)
    kern.set_defaults(func=_kernels)

    cache = bench_sub.add_parser("cache", help="activation cache writer tokens/s and reader rows/s (local, S3)")
    cache.add_argument("--d-model", type=int, default=576)
    cache.add_argument("--shards", type=int, default=8)
    cache.add_argument("--rows-per-shard", type=int, default=16384)
    cache.add_argument("--batch", type=int, default=4096)
    cache.add_argument("--writer-tokens", type=int, default=4096)
    cache.add_argument("--s3-endpoint", default=None, help="an S3 endpoint URL; default: moto on loopback")
    cache.add_argument("--skip-writer", action="store_true")
    cache.set_defaults(func=_cache)


def _add_dist(bench_sub: argparse._SubParsersAction[Any]) -> None:
    dist = bench_sub.add_parser("dist", help="single-process step vs the tp step (gloo), bytes sent per step")
    dist.add_argument("--d-in", type=int, default=576)
    dist.add_argument("--n-latents", type=int, default=16384)
    dist.add_argument("--k", type=int, default=32)
    dist.add_argument("--batch", type=int, default=4096)
    dist.add_argument("--tp", type=int, default=2)
    dist.add_argument("--threads", type=int, default=2, help="threads of the single process")
    dist.add_argument("--repeats", type=int, default=5)
    dist.add_argument("--warmup", type=int, default=2)
    dist.add_argument("--rounds", type=int, default=2, help="alternating single/tp rounds")
    dist.add_argument(
        "--peak-memory",
        action="store_true",
        help="instead: train --repeats steps at tp ranks, per-rank peak RSS vs saescale plan",
    )
    dist.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="fp32",
        help="train.precision of every trainer (and of the plan); default fp32, as in earlier versions",
    )
    dist.add_argument(
        "--micro-batches", type=positive_int, default=1, help="train.micro_batches of every trainer (and of the plan)"
    )
    dist.set_defaults(func=_dist)


def _add_precision(bench_sub: argparse._SubParsersAction[Any]) -> None:
    prec = bench_sub.add_parser(
        "precision", help="held-out NMSE, dead fraction and step time of a short run in fp32 vs low precision"
    )
    prec.add_argument(
        "--precision",
        nargs="+",
        choices=["auto", "bf16", "fp16"],
        default=["bf16"],
        help="precisions compared with the fp32 run (default bf16)",
    )
    prec.add_argument("--d-in", type=int, default=128)
    prec.add_argument("--n-latents", type=int, default=4096)
    prec.add_argument("--k", type=int, default=32)
    prec.add_argument("--batch", type=int, default=1024)
    prec.add_argument("--steps", type=int, default=600)
    prec.add_argument("--n-atoms", type=int, default=2048, help="atoms of the synthetic dictionary")
    prec.add_argument("--active", type=int, default=16, help="atoms per synthetic token")
    prec.add_argument("--lr", type=float, default=1e-3)
    prec.add_argument("--dead-steps", type=int, default=20, help="batches without firing before a latent is dead")
    prec.add_argument("--micro-batches", type=positive_int, default=1)
    prec.add_argument("--seed", type=int, default=0)
    prec.add_argument("--threads", type=int, default=2)
    prec.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    prec.set_defaults(func=_precision)


def _add_recovery(bench_sub: argparse._SubParsersAction[Any]) -> None:
    rec = bench_sub.add_parser("recovery", help="recovery of a known sparse dictionary (AuxK / init ablations)")
    rec.add_argument("--no-auxk", action="store_true")
    rec.add_argument("--no-transpose-init", action="store_true")
    rec.add_argument("--seed", type=int, default=0)
    rec.set_defaults(func=_recovery)


def _add_soak(bench_sub: argparse._SubParsersAction[Any]) -> None:
    soak = bench_sub.add_parser(
        "soak",
        help="the train job on S3 (moto) behind a fault proxy: uninterrupted, then under storage faults "
        "and worker kills; same steps, tokens and weights?",
        description="Run from the project's root. Extra job overrides go after --, e.g. "
        "`saescale bench soak -- train.epochs=10`. Exit 0 when the faulted run ends identical (or, after a node loss moved it to another (dp, tp), not the configured TP ranks as threads, with the same held-out NMSE within 1e-4).",
    )
    soak.add_argument(
        "--cache", default=None, help="a local activation cache (default: the embedded default's, from `make train`)"
    )
    soak.add_argument("--project", default=".", help="the project root (where jobs/train.py is)")
    soak.add_argument("--schedule", choices=["random", "single"], default="random")
    soak.add_argument(
        "--minutes", type=float, default=None, help="(random) how long the faulted run must last (else exit 1)"
    )
    soak.add_argument("--fault-every-s", type=float, default=60.0, help="(random) mean seconds between storage faults")
    soak.add_argument("--max-outage-s", type=float, default=30.0, help="(random) longest storage fault")
    soak.add_argument("--kill-every-s", type=float, default=240.0, help="(random) mean seconds between worker kills")
    soak.add_argument(
        "--preempt-every-s", type=float, default=0.0, help="(random) mean seconds between SIGTERMs (preemption notices)"
    )
    soak.add_argument(
        "--node-kill-every-s",
        type=float,
        default=0.0,
        help="(random) mean seconds between node losses (0: none); both runs then join a multi-node "
        "cluster on this machine, elastic",
    )
    soak.add_argument("--node-down-s", type=float, default=60.0, help="(random) seconds before a lost node is replaced")
    soak.add_argument("--nodes", type=int, default=2, help="(random, with node losses) worker nodes of 2 CPUs")
    soak.add_argument("--outage-s", type=float, default=30.0, help="(single) the outage's length")
    soak.add_argument("--retry-s", type=float, default=120.0, help="storage.retry_s of both runs")
    soak.add_argument("--max-failures", type=int, default=20, help="ray.max_failures of both runs")
    soak.add_argument("--seed", type=int, default=0)
    soak.add_argument("--out", default=None, help="folder for both runs and their logs (default: a temp dir)")
    soak.add_argument("overrides", nargs="*", help="job overrides (key=value), after --")
    soak.set_defaults(func=_soak)


def _add_checkpoint(bench_sub: argparse._SubParsersAction[Any]) -> None:
    ckpt = bench_sub.add_parser(
        "checkpoint", help="a checkpoint's cost to the steps: written in the training thread vs in the background"
    )
    ckpt.add_argument("--d-in", type=int, default=576)
    ckpt.add_argument("--n-latents", type=positive_int, default=2**18)
    ckpt.add_argument("--k", type=positive_int, default=32)
    ckpt.add_argument("--batch", type=positive_int, default=1024)
    ckpt.add_argument("--steps", type=positive_int, default=4, help="steps timed after each checkpoint")
    ckpt.add_argument("--threads", type=positive_int, default=None)
    ckpt.add_argument("--folder", default=None, help="where the checkpoints are written (default: the temp dir)")
    ckpt.set_defaults(func=_checkpoint)


def _add_latents(bench_sub: argparse._SubParsersAction[Any]) -> None:
    latents = bench_sub.add_parser(
        "latents",
        help="2^24 latents at a small width through the real cache and train jobs (checkpoint, resume, export)",
    )
    latents.add_argument("--project", default=".", help="the project root (where jobs/ is)")
    latents.add_argument("--out", default=None, help="folder for the model, cache, run and logs (default: temp)")
    latents.add_argument("--log2-latents", type=positive_int, default=24)
    latents.add_argument("--d-model", type=positive_int, default=16, help="width of the tiny transformer")
    latents.add_argument("--k", type=positive_int, default=4, help="k (small: d_model is 16)")
    latents.add_argument("--workers", type=positive_int, default=4)
    latents.add_argument("--tp", type=positive_int, default=4)
    latents.add_argument("--batch", type=positive_int, default=256)
    latents.add_argument("--steps", type=positive_int, default=12)
    latents.add_argument("--checkpoint-every", type=positive_int, default=4)
    latents.add_argument("--max-tokens", type=positive_int, default=16384, help="tokens the cache job caches")
    latents.add_argument(
        "--memory-per-worker-gib",
        type=float,
        default=3.5,
        help="the planner's budget per worker (micro-batches follow)",
    )
    latents.set_defaults(func=_latents)


def _add_stream(bench_sub: argparse._SubParsersAction[Any]) -> None:
    stream = bench_sub.add_parser(
        "stream",
        help="data.source=model sizing: LM tokens/s per actor vs SAE tokens/s per worker, LM actors per worker",
    )
    stream.add_argument("--model", default="embedded:smollm2-135m-instruct", help="HF id, local dir or embedded:<name>")
    stream.add_argument("--layer", type=int, default=8)
    stream.add_argument("--hook", default="resid_post")
    stream.add_argument("--n-latents", type=positive_int, default=4096)
    stream.add_argument("--k", type=positive_int, default=32)
    stream.add_argument("--batch-per-worker", type=positive_int, default=512, help="train.batch_size / workers")
    stream.add_argument("--lm-threads", type=positive_int, default=1, help="data.lm_actor_cpus")
    stream.add_argument("--worker-threads", type=positive_int, default=1, help="parallel.cpus_per_worker")
    stream.add_argument("--windows-per-batch", type=positive_int, default=16, help="data.lm.windows_per_batch")
    stream.add_argument("--chunks", type=positive_int, default=4, help="LM chunks timed")
    stream.add_argument("--max-wait", type=float, default=0.05, help="the data-wait fraction to stay under")
    stream.set_defaults(func=_stream)
