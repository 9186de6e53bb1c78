"""`saescale plan`: the per-rank memory of a (dp x tp) run, or the fewest workers that fit.

The planner is pure arithmetic (no torch), so the command answers in well under a second.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from saescale.distributed.plan import MemoryPlan


def micro_batches_arg(value: str) -> int | str:
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


def _plan(args: argparse.Namespace) -> int:
    from saescale.distributed.plan import DoesNotFit, PlanError, check_fits, plan_checkpoints

    try:
        plan = _choose_plan(args)
    except DoesNotFit as exc:  # 'auto' or --fewest-workers found nothing that fits: show the closest
        print(json.dumps(exc.plan.to_dict()) if args.json else exc.plan.table())
        print(f"saescale plan: {exc}", file=sys.stderr)
        return 1
    except PlanError as exc:
        print(f"saescale plan: error: {exc}", file=sys.stderr)
        return 2
    checkpoints = plan_checkpoints(plan, args.mtbf_s, args.copy_gb_s, args.upload_gb_s)
    if args.json:
        print(json.dumps({**plan.to_dict(), "checkpoint": asdict(checkpoints)}))
    else:
        print(plan.table())
        print(checkpoints.line())
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


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Register `plan`."""
    plan = sub.add_parser("plan", help="per-rank memory of a (dp x tp) run; exit 1 if it cannot fit")
    plan.add_argument("--n-latents", type=int, required=True)
    plan.add_argument("--d-model", type=int, required=True)
    plan.add_argument("--k", type=int, default=256)
    plan.add_argument("--workers", type=int, help="required unless --fewest-workers")
    plan.add_argument("--tp", type=int, help="required unless --fewest-workers")
    plan.add_argument("--batch", type=int, default=131072, help="global batch in tokens")
    plan.add_argument(
        "--micro-batches",
        type=micro_batches_arg,
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
    plan.add_argument("--mtbf-s", type=float, default=86_400.0, help="expected seconds between failures (ray.mtbf_s)")
    plan.add_argument("--copy-gb-s", type=float, default=5.0, help="assumed rate of a checkpoint's copy to host memory")
    plan.add_argument("--upload-gb-s", type=float, default=0.5, help="assumed storage write rate per rank")
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=_plan)
