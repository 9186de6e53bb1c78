"""`saescale` command line: benchmarks and utilities (training jobs live in jobs/, run by Hydra)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from saescale.distributed.plan import MemoryPlan


def _bench_step(args: argparse.Namespace) -> int:
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
    )
    print(json.dumps(result))
    return 0


def _bench_cache(args: argparse.Namespace) -> int:
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


def _bench_recovery(args: argparse.Namespace) -> int:
    from saescale.bench.recovery import bench_recovery

    print(json.dumps(bench_recovery(auxk=not args.no_auxk, transpose_init=not args.no_transpose_init, seed=args.seed)))
    return 0


def _bench_precision(args: argparse.Namespace) -> int:
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


def _bench_dist(args: argparse.Namespace) -> int:
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


def _bench_soak(args: argparse.Namespace) -> int:
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
        outage_s=args.outage_s,
        retry_s=args.retry_s,
        max_failures=args.max_failures,
        seed=args.seed,
        out=args.out,
    )
    print(json.dumps(result))
    # the faulted run ended as the uninterrupted one did (and, for `random`, lasted --minutes)
    return 0 if result.get("identical") and result.get("long_enough", True) else 1


def _scaling_fit(args: argparse.Namespace) -> int:
    from saescale.sweeps.report import run
    from saescale.sweeps.scaling import FitError

    try:
        run(args.results, args.loss, args.out)
    except (FitError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _plan(args: argparse.Namespace) -> int:
    from saescale.distributed.plan import DoesNotFit, PlanError, check_fits

    try:
        plan = _choose_plan(args)
    except DoesNotFit as exc:  # 'auto' or --fewest-workers found nothing that fits: show the closest
        print(json.dumps(exc.plan.to_dict()) if args.json else exc.plan.table())
        print(f"saescale plan: {exc}", file=sys.stderr)
        return 1
    except PlanError as exc:
        print(f"saescale plan: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict()) if args.json else plan.table())
    try:
        check_fits(plan)
    except PlanError as exc:
        print(f"saescale plan: {exc}", file=sys.stderr)
        return 1
    return 0


def _choose_plan(args: argparse.Namespace) -> MemoryPlan:
    """`--fewest-workers` searches the layout; otherwise plan the given --workers/--tp."""
    from saescale.distributed.plan import PlanError, fewest_workers, plan_memory

    if args.fewest_workers:
        if args.workers is not None or args.tp is not None or args.micro_batches not in (None, "auto"):
            raise PlanError("--fewest-workers chooses --workers, --tp and --micro-batches itself: drop them")
        return fewest_workers(
            args.n_latents,
            args.d_model,
            args.k,
            args.batch,
            args.ema,
            args.precision,
            args.device_gib,
            args.max_micro_batches,
        )
    if args.workers is None or args.tp is None:
        raise PlanError("--workers and --tp are required (or pass --fewest-workers to search for them)")
    return plan_memory(
        args.n_latents,
        args.d_model,
        args.k,
        args.workers,
        args.tp,
        args.batch,
        1 if args.micro_batches is None else args.micro_batches,
        args.ema,
        args.device_gib,
        args.precision,
        args.max_micro_batches,
    )


def _positive_int(value: str) -> int:
    """A positive integer (argparse type)."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}")
    return number


def _micro_batches_arg(value: str) -> int | str:
    """A positive integer or 'auto' (argparse type)."""
    if value == "auto":
        return value
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'auto', got {value!r}")
    return number


def features_folder(target: str) -> str:
    """The features folder of `target`: the folder itself, a run folder holding features/, or a
    run id under runs/ (SAESCALE_RUNS)."""
    import os

    runs = os.environ.get("SAESCALE_RUNS", "runs")
    for folder in (target, os.path.join(target, "features"), os.path.join(runs, target, "features")):
        if os.path.isfile(os.path.join(folder, "index.html")):
            return folder
    raise ValueError(
        f"no feature pages at {target!r} (looked for index.html in it, in {target}/features and in "
        f"{runs}/{target}/features): run python jobs/features.py run_name=<run> first"
    )


def _view(args: argparse.Namespace) -> int:
    import os

    folder = features_folder(args.target)
    live = None
    if args.live and args.max_tokens <= 0:
        raise ValueError(f"--max-tokens must be > 0, got {args.max_tokens}")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: --host {args.host} serves the pages (and --live's model) beyond this machine", flush=True)
    if args.live:
        from saescale import storage
        from saescale.features.live import LiveEncoder
        from saescale.formats.saved import load_sae
        from saescale.lm.models import load_causal_lm

        try:
            with open(os.path.join(folder, "index.json")) as handle:
                info = json.load(handle)
            info["hook"], info["model"], info["sae"]  # noqa: B018 - the keys --live needs
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{folder}/index.json is missing or not saescale feature pages ({exc})") from None
        site, _, layer = info["hook"].rpartition(".")
        sae, _ = load_sae(args.sae or info["sae"], storage_options=storage.endpoint_options(args.endpoint_url))
        lm = load_causal_lm(args.model or info["model"])
        live = LiveEncoder(lm.model, lm.tokenizer, sae, site, int(layer), args.max_tokens)
    from saescale.features.server import make_server

    try:
        server = make_server(folder, args.host, args.port, live)
    except OSError as exc:
        raise ValueError(f"cannot listen on {args.host}:{args.port} ({exc.strerror}); pass --port") from None
    host, port = server.server_address[:2]
    print(
        f"serving {folder} at http://{host}:{port}/" + (" (live inspection on)" if live else "") + "; Ctrl-C stops",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _convert(args: argparse.Namespace) -> int:
    from saescale import storage
    from saescale.formats.convert import convert_sae

    done = convert_sae(args.src, args.dst, args.to, storage.endpoint_options(args.endpoint_url))
    print(
        f"{storage.redact(args.src)} -> {storage.redact(args.dst)} ({done['to']}: {done['n_latents']} latents, "
        f"d_in={done['d_in']}, k={done['k']}, normalization={done['normalization']})"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saescale", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmarks that print JSON")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
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
        type=_positive_int,
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
    step.set_defaults(func=_bench_step)
    cache = bench_sub.add_parser("cache", help="activation cache writer tokens/s and reader rows/s (local, S3)")
    cache.add_argument("--d-model", type=int, default=576)
    cache.add_argument("--shards", type=int, default=8)
    cache.add_argument("--rows-per-shard", type=int, default=16384)
    cache.add_argument("--batch", type=int, default=4096)
    cache.add_argument("--writer-tokens", type=int, default=4096)
    cache.add_argument("--s3-endpoint", default=None, help="an S3 endpoint URL; default: moto on loopback")
    cache.add_argument("--skip-writer", action="store_true")
    cache.set_defaults(func=_bench_cache)
    plan = sub.add_parser("plan", help="per-rank memory of a (dp x tp) run; exit 1 if it cannot fit")
    plan.add_argument("--n-latents", type=int, required=True)
    plan.add_argument("--d-model", type=int, required=True)
    plan.add_argument("--k", type=int, default=256)
    plan.add_argument("--workers", type=int, help="required unless --fewest-workers")
    plan.add_argument("--tp", type=int, help="required unless --fewest-workers")
    plan.add_argument("--batch", type=int, default=131072, help="global batch in tokens")
    plan.add_argument(
        "--micro-batches",
        type=_micro_batches_arg,
        default=None,
        help="an integer (default 1) or 'auto': the fewest (a power of two) that fit",
    )
    plan.add_argument("--max-micro-batches", type=int, default=64, help="the most that 'auto' tries")
    plan.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="train.precision of the workers (default fp32; train.precision=auto is bf16 on GPUs with "
        "native bf16, else fp32)",
    )
    plan.add_argument(
        "--fewest-workers",
        action="store_true",
        help="search the fewest workers (tp a power of two, auto micro-batches) that fit",
    )
    plan.add_argument("--ema", action="store_true")
    plan.add_argument("--device-gib", type=float, default=80.0)
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=_plan)
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
        "--micro-batches", type=_positive_int, default=1, help="train.micro_batches of every trainer (and of the plan)"
    )
    dist.set_defaults(func=_bench_dist)

    scaling = sub.add_parser("scaling", help="scaling-law fits of a sweep's results table")
    scaling_sub = scaling.add_subparsers(dest="scaling_cmd", required=True)
    fit = scaling_sub.add_parser("fit", help="fit L(N), L(N,k), L(C), T(N); print parameters; write fits.json + plots")
    fit.add_argument("results", help="results table (.parquet or .csv), one row per run")
    fit.add_argument("--loss", default="heldout_nmse", help="the loss column")
    fit.add_argument("--out", default="scaling", help="folder for fits.json and the plots")
    fit.set_defaults(func=_scaling_fit)

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
    prec.add_argument("--micro-batches", type=_positive_int, default=1)
    prec.add_argument("--seed", type=int, default=0)
    prec.add_argument("--threads", type=int, default=2)
    prec.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    prec.set_defaults(func=_bench_precision)

    rec = bench_sub.add_parser("recovery", help="recovery of a known sparse dictionary (AuxK / init ablations)")
    rec.add_argument("--no-auxk", action="store_true")
    rec.add_argument("--no-transpose-init", action="store_true")
    rec.add_argument("--seed", type=int, default=0)
    rec.set_defaults(func=_bench_recovery)

    soak = bench_sub.add_parser(
        "soak",
        help="the train job on S3 (moto) behind a fault proxy: uninterrupted, then under storage faults "
        "and worker kills; same steps, tokens and weights?",
        description="Run from the project's root. Extra job overrides go after --, e.g. "
        "`saescale bench soak -- train.epochs=10`. Exit 0 when the faulted run ends identical.",
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
    soak.add_argument("--outage-s", type=float, default=30.0, help="(single) the outage's length")
    soak.add_argument("--retry-s", type=float, default=120.0, help="storage.retry_s of both runs")
    soak.add_argument("--max-failures", type=int, default=20, help="ray.max_failures of both runs")
    soak.add_argument("--seed", type=int, default=0)
    soak.add_argument("--out", default=None, help="folder for both runs and their logs (default: a temp dir)")
    soak.add_argument("overrides", nargs="*", help="job overrides (key=value), after --")
    soak.set_defaults(func=_bench_soak)
    view = sub.add_parser("view", help="serve a run's feature pages (jobs/features.py) on localhost")
    view.add_argument("target", help="a features folder, a run folder, or a run id under runs/")
    view.add_argument("--port", type=int, default=8765, help="0: any free port")
    view.add_argument("--host", default="127.0.0.1")
    view.add_argument("--live", action="store_true", help="also load the LM and SAE: type text, see latents fire")
    view.add_argument("--sae", default=None, help="with --live: the SAE (default: the one the pages were made from)")
    view.add_argument("--model", default=None, help="with --live: the model (default: the cache's)")
    view.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint of --sae")
    view.add_argument("--max-tokens", type=int, default=256, help="with --live: the longest text accepted")
    view.set_defaults(func=_view)
    convert = sub.add_parser(
        "convert", help="convert an SAE (saescale folder, OpenAI .pt, SAELens or sparsify folder) to another format"
    )
    convert.add_argument("src", help="the SAE: a folder or .pt file at any fsspec URL")
    convert.add_argument("dst", help="the folder to write (any fsspec URL)")
    convert.add_argument("--to", required=True, choices=("saescale", "saelens", "sparsify"))
    convert.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint of SRC and DST")
    convert.set_defaults(func=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, RuntimeError) as exc:
        print(f"saescale: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
