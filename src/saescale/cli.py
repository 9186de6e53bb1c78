"""`saescale` command line: benchmarks and utilities (training jobs live in jobs/, run by Hydra)."""

# Only the wiring: each subcommand's parser and body live with the package it drives, and import
# their heavy modules (torch, ray) only when they run, so `saescale --help` stays fast.

from __future__ import annotations

import argparse
import sys

from saescale.bench import cli as bench_cli
from saescale.distributed import plan_cli
from saescale.features import view_cli
from saescale.formats import convert_cli
from saescale.service import cluster_cli
from saescale.sweeps import scaling_cli

# in the order `saescale --help` lists the subcommands
_COMMANDS = (bench_cli, plan_cli, scaling_cli, view_cli, convert_cli, cluster_cli)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saescale", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in _COMMANDS:
        command.add_parser(sub)
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
