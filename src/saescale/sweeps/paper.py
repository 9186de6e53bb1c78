"""The paper's experiments (Gao et al. 2024) as sweeps of the training job: `make paper`.

Each experiment is a Hydra experiment config (`conf/experiment/paper/<name>.yaml`) run as a
multirun of `jobs/train.py` through the service's own launcher (`hydra/launcher=
saescale_ray_jobs`): one Ray Job per run, as many at once as the cluster holds, on an embedded
local Ray unless an address is given, and a run skipped when the same config finished before (so
an interrupted `make paper` resumes). A preset says which grid each experiment sweeps; a stage
that depends on earlier results (the frontier's grid at each architecture's best lr, the metrics
of each size's best run) reads the finished runs' `result.json`. Downstream KL and the paper's
other metrics come from `jobs/eval.py` on a run's saved SAE, written beside it. The report is
built from those files alone (`report_rows`), so it can be rebuilt at any time.

No Ray here: the sweeps run as commands, exactly as a user would type them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from saescale.console import print0

Row = dict[str, Any]

EXPERIMENTS = ("lr", "frontier", "progressive", "scaling", "dead", "metrics", "report")
SMALL_CACHE = "runs/cache/smollm2-resid8"  # make train's cache: 150k tokens
LARGE_CACHE = "runs/cache/smollm2-resid8-1m"  # 1M tokens, for budgets that grow with N (scaling.yaml)
AUXK_COEF = 1 / 32  # the paper's AuxK coefficient (the `dead` experiment turns it off too)


class PaperError(RuntimeError):
    """A stage of the experiments cannot go on (a failed run, a missing cache)."""


@dataclass(frozen=True)
class Preset:
    lr_ns: tuple[int, ...]
    lr_mults: tuple[float, ...]
    lr_epochs: tuple[int, ...]
    frontier_ks: tuple[int, ...]
    frontier_l1s: tuple[float, ...]
    frontier_lr_mults: tuple[float, ...]
    scaling_ns: tuple[int, ...]
    scaling_ks: tuple[int, ...]
    scaling_epochs: dict[int, int]  # epochs of the large cache per N: budgets grow with N
    scaling_lr_mults: tuple[float, ...]
    dead_ns: tuple[int, ...]
    seeds: tuple[int, ...] = (0,)
    metrics_k: int = 32  # the scaling runs `metrics` evaluates (each N's best lr at this k)
    eval_windows: int = 64


PRESETS = {
    # the grid: hours on a 2-core CPU (see docs/paper/README.md for measured times)
    "full": Preset(
        lr_ns=(512, 2048, 8192),
        lr_mults=(1, 2, 4, 8, 16),
        lr_epochs=(1, 3),
        frontier_ks=(8, 16, 32, 64, 128),
        frontier_l1s=(0.0005, 0.001, 0.002, 0.004, 0.008),
        frontier_lr_mults=(0.5, 1, 2),
        scaling_ns=(512, 1024, 2048, 4096, 8192, 16384),
        scaling_ks=(16, 32),
        scaling_epochs={512: 1, 1024: 1, 2048: 1, 4096: 2, 8192: 3, 16384: 4},
        scaling_lr_mults=(0.5, 1, 2),
        dead_ns=(1024, 4096, 16384),
        seeds=(0, 1),
    ),
}
# what fits a working session on 2 cores: the full grid, smaller
PRESETS["quick"] = dataclasses.replace(
    PRESETS["full"],
    lr_ns=(512, 2048, 4096),
    scaling_ns=(512, 1024, 2048, 4096, 8192),
    scaling_epochs={512: 1, 1024: 1, 2048: 1, 4096: 1, 8192: 2},
    dead_ns=(1024, 4096),
    seeds=(0,),
)


def _values(values: tuple[Any, ...] | list[Any]) -> str:
    """A Hydra sweep list: 1,2,4 (floats as %g, booleans in lower case)."""
    return ",".join(
        str(v).lower() if isinstance(v, bool) else f"{v:g}" if isinstance(v, float) else str(v) for v in values
    )


@dataclass(frozen=True)
class Sweep:
    """One multirun: an experiment config, the stage's name (its sweep folder) and its grid."""

    experiment: str
    stage: str
    grid: tuple[str, ...]


@dataclass
class Sweeper:
    """Runs the stages as commands and reads back what their runs wrote.

    `launcher` holds the launcher's overrides (e.g. `hydra.launcher.address=http://head:8265`);
    `work` the sweeps' folders (results.parquet, timeline.png, job logs), one per stage."""

    root: str  # the checkout: jobs/, conf/, and the working directory of every command
    work: str
    launcher: list[str] = field(default_factory=list)
    python: str = sys.executable
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run

    def sweep_dir(self, stage: str) -> str:
        return os.path.join(self.work, "sweeps", stage)

    def sweep(self, sweep: Sweep) -> list[Row]:
        """The stage's multirun (finished runs are skipped by the launcher), then its rows."""
        cmd = [
            self.python,
            os.path.join(self.root, "jobs", "train.py"),
            "-m",
            f"+experiment=paper/{sweep.experiment}",
            *sweep.grid,
            f"hydra.sweep.dir={self.sweep_dir(sweep.stage)}",
            *self.launcher,
        ]
        print0(f"paper: {sweep.stage}: {shlex.join(cmd)}")
        proc = self.run(cmd, cwd=self.root)
        rows, failed = self.rows(sweep.stage, sweep.experiment)
        if proc.returncode != 0 or failed or not rows:
            raise PaperError(
                f"{len(failed)} run(s) of stage {sweep.stage} failed ({', '.join(failed) or 'no runs finished'}); "
                f"their logs: {self.sweep_dir(sweep.stage)}/<num>/job.log; rerun to retry them (finished runs are skipped)"
            )
        return rows

    def rows(self, stage: str, experiment: str) -> tuple[list[Row], list[str]]:
        """The finished runs of a stage's last sweep as report rows, and the names of the others."""
        import pyarrow.parquet as pq

        path = os.path.join(self.sweep_dir(stage), "results.parquet")
        if not os.path.exists(path):
            return [], []
        rows, failed = [], []
        for run in pq.read_table(path).to_pylist():
            if run["status"] != "finished":
                failed.append(run["run_name"])
                continue
            output_dir = os.path.join(self.root, run["output_dir"])  # absolute stays absolute
            with open(os.path.join(output_dir, "result.json")) as handle:
                rows.append(paper_row(experiment, json.load(handle), output_dir))
        return rows, failed

    def evaluate(self, row: Row, full: bool, windows: int) -> dict[str, Any]:
        """`jobs/eval.py` on a run's SAE (downstream KL; with `full` also probes, N2G and ablation),
        written beside it: `<run>/eval` (full) or `<run>/eval-kl`; done once."""
        out = os.path.join(row["output_dir"], "eval" if full else "eval-kl")
        results = os.path.join(out, "results.json")
        if not os.path.exists(results):
            cmd = [
                self.python,
                os.path.join(self.root, "jobs", "eval.py"),
                f"run_name={row['key']}",
                f"sae={row['sae']}",
                f"data.cache={row['cache']}",
                f"output_dir={out}",
                "wandb.enabled=false",
                f"downstream.windows={windows}",
            ]
            if not full:
                cmd += ["probes.enabled=false", "explain.enabled=false", "ablation.enabled=false"]
            print0(f"paper: eval {row['key']}{' (full)' if full else ''}")
            proc = self.run(cmd, cwd=self.root, capture_output=True, text=True)
            if proc.returncode != 0:
                raise PaperError(f"jobs/eval.py failed on {row['key']}: {proc.stderr.strip()[-2000:]}")
        with open(results) as handle:
            return json.load(handle)


def paper_row(experiment: str, result: dict[str, Any], output_dir: str) -> Row:
    """One report row from a training run's result.json (and its eval results, when written)."""
    sae, train = result["sae"], result["train"]
    row: Row = {
        "key": result["run_id"],
        "name": result["run_id"],
        "experiment": experiment,
        "n": result["n_latents"],
        "k": result["k"],
        "architecture": sae["architecture"],
        "l1": sae["l1_coef"],
        "multi_topk": sae["multi_topk"],
        "auxk": sae["auxk_coef"] > 0,
        "transpose_init": train["init_transpose"],
        "lr_rule": train["lr_rule"],
        "lr_mult": train["lr_scale"],
        "lr": result["lr"],
        "epochs": train["epochs"],
        "seed": train["seed"],
        "cache": result["cache"],
        "tokens": result["tokens"],
        "steps": result["steps"],
        "seconds": result["train_wall_s"],  # the Ray job's training, start-up included
        "heldout_nmse": result["heldout_nmse"],
        "heldout_l0": result["heldout_l0"],
        "heldout_dead_fraction": result["heldout_dead_fraction"],  # never fired on the held-out rows
        "train_dead_fraction": result["dead_fraction"],  # the AuxK counter at the end of training
        "output_dir": output_dir,
        "sae": os.path.join(output_dir, "sae"),
    }
    if "threshold" in result:
        row["threshold"] = result["threshold"]
    for k, value in (result.get("nmse_at_k") or {}).items():
        row[f"nmse_at_k{k}"] = value
    kl = os.path.join(output_dir, "eval-kl", "results.json")
    if os.path.exists(kl):
        with open(kl) as handle:
            row["kl"] = json.load(handle)["downstream"]["kl_clean_to_spliced"]
    full = os.path.join(output_dir, "eval", "results.json")
    if os.path.exists(full):
        with open(full) as handle:
            row["eval"] = eval_summary(json.load(handle))
    return row


def eval_summary(result: dict[str, Any]) -> dict[str, Any]:
    """The metrics-against-N numbers of one eval result, with their spread."""
    import numpy as np

    probes = [t["probe_loss"] for t in result["probes"]["tasks"]]
    latents = result["explanations"]["latents"]
    prec = np.array([lat["precision"] for lat in latents], dtype=np.float64)  # NaN: never predicts firing
    rec = np.array([lat["recall"] for lat in latents], dtype=np.float64)
    return {
        "probe_loss": float(np.mean(probes)),
        "probe_loss_std": float(np.std(probes)),
        "probe_tasks": len(probes),
        "n2g_precision": float(np.nanmean(prec)),
        "n2g_precision_std": float(np.nanstd(prec)),
        "n2g_recall": float(np.nanmean(rec)),
        "n2g_recall_std": float(np.nanstd(rec)),
        "n2g_latents": len(latents),
        "ablation_sparsity": result["ablation_sparsity"]["mean"],
        "ablation_pairs": result["ablation_sparsity"]["pairs"],
        "kl": result["downstream"]["kl_clean_to_spliced"],
        "ce_increase": result["downstream"]["ce_increase"],
    }


def best(rows: list[Row], group: tuple[str, ...]) -> dict[tuple, Row]:
    """The lowest held-out NMSE per group (e.g. the best lr of each (architecture, k))."""
    out: dict[tuple, Row] = {}
    for row in rows:
        key = tuple(row[g] for g in group)
        if key not in out or row["heldout_nmse"] < out[key]["heldout_nmse"]:
            out[key] = row
    return out


# ----------------------------------------------------------------------- the experiments' sweeps
def lr_sweeps(p: Preset) -> list[Sweep]:
    grid = (f"sae.n_latents={_values(p.lr_ns)}", f"train.epochs={_values(p.lr_epochs)}")
    return [Sweep("lr", "lr", (*grid, f"train.lr_scale={_values(p.lr_mults)}"))]


def frontier_lr_sweeps(p: Preset) -> list[Sweep]:
    """The lr sweep at the middle of each architecture's grid."""
    mid_k, mid_l1 = p.frontier_ks[len(p.frontier_ks) // 2], p.frontier_l1s[len(p.frontier_l1s) // 2]
    mults = f"train.lr_scale={_values(p.frontier_lr_mults)}"
    return [
        Sweep("frontier", "frontier-lr", ("sae.architecture=topk,batchtopk", f"sae.k={mid_k}", mults)),
        Sweep(
            "frontier", "frontier-lr-relu", ("sae.architecture=relu", f"sae.k={mid_k}", f"sae.l1_coef={mid_l1}", mults)
        ),
    ]


def frontier_grid_sweeps(p: Preset, best_mult: dict[str, float]) -> list[Sweep]:
    """Each architecture's whole grid at its best lr multiple."""
    mid_k = p.frontier_ks[len(p.frontier_ks) // 2]
    sweeps = []
    for arch, mult in sorted(best_mult.items()):
        grid = (
            (f"sae.k={mid_k}", f"sae.l1_coef={_values(p.frontier_l1s)}")
            if arch == "relu"
            else (f"sae.k={_values(p.frontier_ks)}",)
        )
        sweeps.append(
            Sweep("frontier", f"frontier-{arch}", (f"sae.architecture={arch}", *grid, f"train.lr_scale={mult:g}"))
        )
    return sweeps


def progressive_sweeps(p: Preset) -> list[Sweep]:
    return [Sweep("progressive", "progressive", ("sae.multi_topk=false,true",))]


def scaling_sweeps(p: Preset) -> list[Sweep]:
    """One sweep per token budget (epochs of the 1M-token cache), its sizes x k x lr x seed."""
    by_epochs: dict[int, list[int]] = {}
    for n in p.scaling_ns:
        by_epochs.setdefault(p.scaling_epochs[n], []).append(n)
    return [
        Sweep(
            "scaling",
            f"scaling-e{epochs}",
            (
                f"sae.n_latents={_values(ns)}",
                f"train.epochs={epochs}",
                f"sae.k={_values(p.scaling_ks)}",
                f"train.lr_scale={_values(p.scaling_lr_mults)}",
                f"train.seed={_values(p.seeds)}",
            ),
        )
        for epochs, ns in sorted(by_epochs.items())
    ]


def dead_sweeps(p: Preset) -> list[Sweep]:
    return [
        Sweep(
            "dead",
            "dead",
            (
                f"sae.n_latents={_values(p.dead_ns)}",
                f"sae.auxk_coef={AUXK_COEF:g},0",
                "train.init_transpose=true,false",
            ),
        )
    ]


def run_experiments(p: Preset, only: list[str], sweeper: Sweeper) -> list[Row]:
    """The experiments asked for, in order; returns every row they produced."""
    rows: list[Row] = []

    def run(sweeps: list[Sweep]) -> list[Row]:
        out = [row for sweep in sweeps for row in sweeper.sweep(sweep)]
        rows.extend(out)
        return out

    if "lr" in only:
        run(lr_sweeps(p))
    if "frontier" in only:
        first = run(frontier_lr_sweeps(p))
        best_mult = {arch: row["lr_mult"] for (arch,), row in best(first, ("architecture",)).items()}
        print0("paper: frontier at the best lr: " + ", ".join(f"{a} {m:g} x the default" for a, m in best_mult.items()))
        for row in run(frontier_grid_sweeps(p, best_mult)) + first:
            if "kl" not in row:
                row["kl"] = sweeper.evaluate(row, full=False, windows=p.eval_windows)["downstream"][
                    "kl_clean_to_spliced"
                ]
    if "progressive" in only:
        run(progressive_sweeps(p))
    if "scaling" in only or "metrics" in only:
        scaling = run(scaling_sweeps(p))
        if "metrics" in only:
            chosen = best([r for r in scaling if r["k"] == p.metrics_k], ("n", "k", "seed"))
            for row in chosen.values():
                if "eval" not in row:
                    row["eval"] = eval_summary(sweeper.evaluate(row, full=True, windows=p.eval_windows))
    if "dead" in only:
        run(dead_sweeps(p))
    return rows


def report_rows(p: Preset, sweeper: Sweeper) -> list[Row]:
    """Every finished run of the preset's stages, read back from their sweep folders (the
    frontier's grid stages by name: they exist only once the lr stage picked the best lr)."""
    stages = lr_sweeps(p) + frontier_lr_sweeps(p) + progressive_sweeps(p) + scaling_sweeps(p) + dead_sweeps(p)
    stages += [Sweep("frontier", f"frontier-{arch}", ()) for arch in ("batchtopk", "relu", "topk")]
    found: dict[str, Row] = {}
    for stage in stages:
        for row in sweeper.rows(stage.stage, stage.experiment)[0]:
            found[row["key"]] = row  # a run in two stages (the frontier's middle k) counts once
    return list(found.values())


def check_caches(root: str, only: list[str]) -> None:
    """Both caches must exist before any sweep starts (one line naming the command that builds it)."""
    caches = [(SMALL_CACHE, 150_000)]
    if "scaling" in only or "metrics" in only:
        caches.append((LARGE_CACHE, 1_000_000))
    for cache, tokens in caches:
        if not os.path.exists(os.path.join(root, cache, "manifest.json")):
            raise PaperError(f"no cache at {cache}; build it: python jobs/cache.py max_tokens={tokens} output={cache}")
