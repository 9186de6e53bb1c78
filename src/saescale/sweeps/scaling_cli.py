"""`saescale scaling fit`: scaling-law fits of a sweep's results table (the fits and plots are
`sweeps.report`'s; scipy and matplotlib load only when the command runs)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def _fit(args: argparse.Namespace) -> int:
    from saescale.sweeps.report import run
    from saescale.sweeps.scaling import FitError

    try:
        run(args.results, args.loss, args.out)
    except (FitError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Register `scaling` and its `fit` subcommand."""
    scaling = sub.add_parser("scaling", help="scaling-law fits of a sweep's results table")
    scaling_sub = scaling.add_subparsers(dest="scaling_cmd", required=True)
    fit = scaling_sub.add_parser("fit", help="fit L(N), L(N,k), L(C), T(N); print parameters; write fits.json + plots")
    fit.add_argument("results", help="results table (.parquet or .csv), one row per run")
    fit.add_argument("--loss", default="heldout_nmse", help="the loss column")
    fit.add_argument("--out", default="scaling", help="folder for fits.json and the plots")
    fit.set_defaults(func=_fit)
