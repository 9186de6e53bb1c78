"""The paper's comparisons (Gao et al. 2024) reproduced on the embedded default: `make paper`.

    python jobs/paper.py                      # every experiment, the `full` preset
    python jobs/paper.py --preset quick       # the smaller grid this repo's docs/paper came from
    python jobs/paper.py --only lr,frontier   # some experiments (lr, frontier, progressive,
                                              # scaling, dead, metrics, report)
    python jobs/paper.py --address http://HEAD:8265   # the runs as Ray Jobs on a cluster

Each experiment is a Hydra experiment config (conf/experiment/paper/) run as sweeps of
jobs/train.py through the service's own launcher: one Ray Job per run, several at once, a run
skipped when the same config finished (an interrupted `make paper` resumes). Downstream KL and the
other metrics come from jobs/eval.py on the saved SAEs. `report` writes docs/paper/ from the runs'
result.json files alone. The experiments (saescale.sweeps.paper):
  lr           NMSE against lr (multiples of the paper's 2e-4/sqrt(N/2^14)) for several N and token
               budgets: the data behind the default lr rule (`TrainConfig.resolved_lr`)
  frontier     TopK (k sweep), BatchTopK (k sweep) and ReLU (an L1 sweep) at one N: held-out NMSE
               and downstream KL against L0, each architecture at its best lr of a small sweep
  progressive  TopK and Multi-TopK evaluated at test-time k from k/4 to 4k
  scaling      N from 512 up with token budgets that grow with N, a small lr sweep per N; the
               best run per (N, k) is picked by `saescale scaling fit`, which refits L(N), L(N, k)
  dead         the fraction of dead latents against N, with and without AuxK and transpose init
  metrics      jobs/eval.py on the k=32 scaling runs (the best lr per N): probe loss, N2G precision
               and recall, ablation sparsity, downstream KL, with their spread over latents/tasks
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from saescale.console import print0
from saescale.sweeps.paper import EXPERIMENTS, PRESETS, PaperError, Sweeper, check_caches, report_rows, run_experiments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--only", default=",".join(EXPERIMENTS), help="comma-separated: " + ",".join(EXPERIMENTS))
    parser.add_argument("--work", default=None, help="the sweeps' folders (default runs/paper/<preset>)")
    parser.add_argument("--out", default="docs/paper", help="tables and plots")
    parser.add_argument("--address", default=None, help="the Ray cluster's job server (default: an embedded local Ray)")
    parser.add_argument("--max-concurrent", type=int, default=None, help="runs at once (default: as the cluster holds)")
    args = parser.parse_args(argv)
    only = [e.strip() for e in args.only.split(",") if e.strip()]
    unknown = sorted(set(only) - set(EXPERIMENTS))
    if unknown:
        print(f"error: unknown experiments {unknown}; choose from {', '.join(EXPERIMENTS)}", file=sys.stderr)
        return 2
    launcher = [f"hydra.launcher.address={args.address}"] if args.address else []
    if args.max_concurrent:
        launcher.append(f"hydra.launcher.max_concurrent={args.max_concurrent}")
    preset = PRESETS[args.preset]
    sweeper = Sweeper(ROOT, args.work or os.path.join(ROOT, "runs", "paper", args.preset), launcher)
    start = time.perf_counter()
    try:
        check_caches(ROOT, only)
        run_experiments(preset, only, sweeper)
    except PaperError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if "report" in only:
        from saescale.sweeps.paper_report import write_report

        write_report(report_rows(preset, sweeper), os.path.join(ROOT, args.out), args.preset)
    print0(f"paper: done in {time.perf_counter() - start:.0f} s; sweeps in {sweeper.work}/sweeps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
