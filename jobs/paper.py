"""The paper's comparisons (Gao et al. 2024) reproduced on the embedded default: `make paper`.

    python jobs/paper.py                      # every experiment, the `full` preset
    python jobs/paper.py --preset quick       # the smaller grid this repo's docs/paper came from
    python jobs/paper.py --only lr,frontier   # some experiments (lr, frontier, progressive,
                                              # scaling, dead, metrics, report)

Every SAE is trained by the one training core (`saescale.train.trainer.Trainer`, the loop that
`jobs/train.py` runs on Ray Train) in this process, on activation caches built by `jobs/cache.py`,
each on the same shuffled batches per seed; held-out metrics use the cache's shard 0, which
training never reads. Downstream KL and the paper's other metrics come from `jobs/eval.py`, run
as a command on the saved SAE. Results are appended to `<work>/runs.jsonl` as each run ends, so
an interrupted `make paper` resumes where it stopped; `report` writes the tables and plots to
`docs/paper/` from that file alone.

Experiments:
  lr           NMSE against lr (multiples of the paper's 2e-4/sqrt(N/2^14)) for several N and token
               budgets: the data behind the default lr rule (`TrainConfig.resolved_lr`)
  frontier     TopK (k sweep), BatchTopK (k sweep) and ReLU (an L1 sweep) at one N: held-out NMSE
               and downstream KL against L0, each architecture at its best lr of a small sweep
  progressive  TopK and Multi-TopK evaluated at test-time k from k/4 to 4k
  scaling      N from 512 up with token budgets that grow with N, a small lr sweep per N; the
               best run per (N, k) is picked by `saescale scaling fit`, which refits L(N), L(N, k)
  dead         the fraction of dead latents against N, with and without AuxK and transpose init
  metrics      `jobs/eval.py` on the k=32 scaling runs (the best lr per N): probe loss, N2G precision
               and recall, ablation sparsity, downstream KL, with their spread over latents/tasks
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch

from saescale.console import print0

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_CACHE = "runs/cache/smollm2-resid8"  # make train's cache: 150k tokens
LARGE_CACHE = "runs/cache/smollm2-resid8-1m"  # 1M tokens, for budgets that grow with N
BATCH = 1024
DEAD_TOKENS = 100_000  # a latent unfired this long is dead (AuxK's mask); runs are 0.1-3M tokens


@dataclass(frozen=True)
class Run:
    """One SAE to train; `lr_mult` multiplies the paper's 2e-4/sqrt(N/2^14) unless `lr_rule`
    is "default" (then it multiplies saescale's default for the run's token budget)."""

    experiment: str
    n: int
    k: int
    architecture: str = "topk"
    l1: float = 0.0
    lr_mult: float = 1.0
    lr_rule: str = "paper"
    epochs: int = 3
    cache: str = SMALL_CACHE
    multi_topk: bool = False
    auxk: bool = True
    transpose_init: bool = True
    seed: int = 0
    save: bool = False  # keep the SAE (for jobs/eval.py)

    @property
    def key(self) -> str:
        fields = {k: v for k, v in asdict(self).items() if k != "save"}
        return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]

    @property
    def name(self) -> str:
        arch = self.architecture if self.architecture != "relu" else f"relu-l1{self.l1:g}"
        extra = "-multi" if self.multi_topk else ""
        extra += "" if self.auxk else "-noauxk"
        extra += "" if self.transpose_init else "-notranspose"
        return f"{self.experiment}-{arch}-n{self.n}-k{self.k}-lr{self.lr_rule}x{self.lr_mult:g}-e{self.epochs}{extra}"


@dataclass
class Preset:
    lr_ns: tuple[int, ...]
    lr_mults: tuple[float, ...]
    lr_epochs: tuple[int, ...]
    frontier_n: int
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
    extra: dict = field(default_factory=dict)


PRESETS = {
    # the grid: hours on a 2-core CPU (see docs/paper/README.md for measured times)
    "full": Preset(
        lr_ns=(512, 2048, 8192),
        lr_mults=(1, 2, 4, 8, 16),
        lr_epochs=(1, 3),
        frontier_n=4096,
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
# what fits a working session, about an hour and a half on 2 cores: the full grid, smaller
PRESETS["quick"] = dataclasses.replace(
    PRESETS["full"],
    lr_ns=(512, 2048, 4096),
    scaling_ns=(512, 1024, 2048, 4096, 8192),
    scaling_epochs={512: 1, 1024: 1, 2048: 1, 4096: 1, 8192: 2},
    dead_ns=(1024, 4096),
    seeds=(0,),
)
EXPERIMENTS = ("lr", "frontier", "progressive", "scaling", "dead", "metrics", "report")


# ------------------------------------------------------------------------------------ data
class Activations:
    """A cache's training rows (all shards but 0) and held-out rows (shard 0), in memory."""

    def __init__(self, url: str) -> None:
        from saescale.data.reader import ActivationCache

        cache = ActivationCache(url)
        shards = len(cache.manifest.shards)
        self.url = url
        self.heldout = cache.read_shard(0).float()
        self.train = torch.cat([cache.read_shard(s, torch.float16) for s in range(1, shards)])

    def batches(self, epochs: int, seed: int) -> Iterator[torch.Tensor]:
        """The same shuffled batches for the same (epochs, seed): runs compare on equal data."""
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            order = torch.randperm(self.train.shape[0], generator=generator)
            for start in range(0, self.train.shape[0] - BATCH + 1, BATCH):
                yield self.train[order[start : start + BATCH]].float()

    def tokens(self, epochs: int) -> int:
        return epochs * (self.train.shape[0] // BATCH) * BATCH


_DATA: dict[str, Activations] = {}


def data(url: str) -> Activations:
    if url not in _DATA:
        _DATA.clear()  # one cache in memory at a time
        _DATA[url] = Activations(os.path.join(ROOT, url))
    return _DATA[url]


# ----------------------------------------------------------------------------------- train
def paper_lr(n: int) -> float:
    return 2e-4 / math.sqrt(n / 2**14)


def train_run(run: Run, work: str) -> dict:
    from saescale.core.config import NEVER, SAEConfig, TrainConfig
    from saescale.core.model import TopKSAE
    from saescale.evaluation.reconstruction import reconstruction_metrics
    from saescale.formats.saved import save_sae
    from saescale.train.trainer import Trainer

    acts = data(run.cache)
    tokens = acts.tokens(run.epochs)
    base = TrainConfig(budget_tokens=tokens)
    lr = run.lr_mult * (paper_lr(run.n) if run.lr_rule == "paper" else base.resolved_lr(run.n))
    sae_cfg = SAEConfig(
        d_in=acts.heldout.shape[1],
        n_latents=run.n,
        k=run.k,
        architecture=run.architecture,
        l1_coef=run.l1,
        multi_topk=run.multi_topk,
        auxk_coef=1 / 32 if run.auxk else 0.0,
        dead_tokens_threshold=DEAD_TOKENS,
    )
    train_cfg = TrainConfig(
        lr=lr, seed=run.seed, init_transpose=run.transpose_init, log_every=NEVER, histogram_every=NEVER
    )
    trainer = Trainer(TopKSAE(sae_cfg), train_cfg)
    start = time.perf_counter()
    summary = trainer.fit(acts.batches(run.epochs, run.seed))
    seconds = time.perf_counter() - start
    sae = trainer.sae
    metrics = reconstruction_metrics(sae, acts.heldout)
    row = {
        "key": run.key,
        "name": run.name,
        **asdict(run),
        "lr": lr,
        "tokens": trainer.tokens_seen,
        "steps": summary.steps,
        "seconds": round(seconds, 1),
        "heldout_nmse": metrics.nmse,
        "heldout_l0": metrics.l0,
        "heldout_dead_fraction": metrics.dead_fraction,  # never fired on the held-out rows
        "train_dead_fraction": float(trainer.tracker.dead_mask().float().mean()),  # the AuxK counter
    }
    if run.architecture == "batchtopk":
        row["threshold"] = float(sae.threshold)
    if run.experiment == "progressive":
        for k in (run.k // 4, run.k // 2, run.k, 2 * run.k, 4 * run.k):
            with torch.no_grad():
                normed, info = sae.normalize(acts.heldout)
                x_hat = sae.denormalize(sae.decode_normed(sae.encode_normed(normed, k)), info)
            err = (x_hat - acts.heldout).pow(2).sum() / (acts.heldout - acts.heldout.mean(0)).pow(2).sum()
            row[f"nmse_at_k{k}"] = float(err)
    if run.save:
        folder = os.path.join(work, "saes", run.key)
        save_sae(sae, folder, metadata={"model": "embedded:smollm2-135m-instruct", "hook": "resid_post.8"})
        row["sae"] = folder
    return row


def evaluate(row: dict, work: str, full: bool, windows: int) -> dict:
    """`jobs/eval.py` on a saved SAE: downstream KL (and with `full`, probes, N2G, ablation)."""
    out = os.path.join(work, "eval", row["key"] + ("-full" if full else ""))
    results = os.path.join(out, "results.json")
    if not os.path.exists(results):
        cmd = [
            sys.executable,
            os.path.join(ROOT, "jobs", "eval.py"),
            f"run_name={row['key']}",
            f"sae={row['sae']}",
            f"data.cache={os.path.join(ROOT, row['cache'])}",
            f"output_dir={out}",
            "wandb.enabled=false",
            f"downstream.windows={windows}",
        ]
        if not full:
            cmd += ["probes.enabled=false", "explain.enabled=false", "ablation.enabled=false"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"jobs/eval.py failed on {row['name']}: {proc.stderr.strip()[-2000:]}")
    with open(results) as handle:
        return json.load(handle)


# ------------------------------------------------------------------------------- bookkeeping
class Ledger:
    """runs.jsonl: one line per finished run (appended as it ends, so a rerun resumes)."""

    def __init__(self, work: str) -> None:
        self.path = os.path.join(work, "runs.jsonl")
        self.rows: dict[str, dict] = {}
        if os.path.exists(self.path):
            with open(self.path) as handle:
                for line in handle:
                    if line.strip():
                        row = json.loads(line)
                        self.rows[row["key"]] = row

    def add(self, row: dict) -> None:
        self.rows[row["key"]] = row
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")

    def get(self, run: Run) -> dict | None:
        return self.rows.get(run.key)


def run_all(runs: list[Run], ledger: Ledger, work: str) -> list[dict]:
    todo = [r for r in runs if ledger.get(r) is None]
    print0(f"{len(runs)} runs, {len(runs) - len(todo)} done before, {len(todo)} to train")
    for i, run in enumerate(todo, 1):
        row = train_run(run, work)
        ledger.add(row)
        print0(
            f"[{i}/{len(todo)}] {run.name}: NMSE {row['heldout_nmse']:.4f}, L0 {row['heldout_l0']:.1f}, "
            f"dead {row['heldout_dead_fraction']:.1%}, {row['seconds']:.0f} s"
        )
    return [ledger.get(r) for r in runs]  # type: ignore[misc]


def best(rows: list[dict], group: tuple[str, ...]) -> dict[tuple, dict]:
    """The lowest held-out NMSE per group (e.g. the best lr of each (architecture, k))."""
    out: dict[tuple, dict] = {}
    for row in rows:
        key = tuple(row[g] for g in group)
        if key not in out or row["heldout_nmse"] < out[key]["heldout_nmse"]:
            out[key] = row
    return out


# ------------------------------------------------------------------------------ experiments
def lr_runs(p: Preset) -> list[Run]:
    return [Run("lr", n, 32, lr_mult=m, epochs=e) for n in p.lr_ns for e in p.lr_epochs for m in p.lr_mults]


def frontier_runs(p: Preset, ledger: Ledger, work: str) -> list[Run]:
    """The lr sweep at the middle of each architecture's grid, then its whole grid at its best lr."""
    n, mid_k, mid_l1 = p.frontier_n, p.frontier_ks[len(p.frontier_ks) // 2], p.frontier_l1s[len(p.frontier_l1s) // 2]
    sweeps = {
        "topk": [Run("frontier", n, mid_k, lr_rule="default", lr_mult=m, save=True) for m in p.frontier_lr_mults],
        "batchtopk": [
            Run("frontier", n, mid_k, "batchtopk", lr_rule="default", lr_mult=m, save=True) for m in p.frontier_lr_mults
        ],
        "relu": [
            Run("frontier", n, mid_k, "relu", l1=mid_l1, lr_rule="default", lr_mult=m, save=True)
            for m in p.frontier_lr_mults
        ],
    }
    runs = [r for sweep in sweeps.values() for r in sweep]
    for arch, sweep in sweeps.items():
        rows = run_all(sweep, ledger, work)
        mult = min(rows, key=lambda r: r["heldout_nmse"])["lr_mult"]
        print0(f"frontier: {arch} at its best lr, {mult:g} x the default")
        if arch == "relu":
            runs += [
                Run("frontier", n, mid_k, "relu", l1=l1, lr_rule="default", lr_mult=mult, save=True)
                for l1 in p.frontier_l1s
            ]
        else:
            runs += [Run("frontier", n, k, arch, lr_rule="default", lr_mult=mult, save=True) for k in p.frontier_ks]
    return list(dict.fromkeys(runs))


def progressive_runs(p: Preset) -> list[Run]:
    n = p.frontier_n
    return [Run("progressive", n, 32, lr_rule="default"), Run("progressive", n, 32, lr_rule="default", multi_topk=True)]


def scaling_runs(p: Preset) -> list[Run]:
    return [
        Run(
            "scaling",
            n,
            k,
            lr_rule="default",
            lr_mult=m,
            epochs=p.scaling_epochs[n],
            cache=LARGE_CACHE,
            seed=s,
            save=True,
        )
        for n in p.scaling_ns
        for k in p.scaling_ks
        for m in p.scaling_lr_mults
        for s in p.seeds
    ]


def dead_runs(p: Preset) -> list[Run]:
    return [
        Run("dead", n, 32, lr_rule="default", epochs=3, auxk=auxk, transpose_init=tr)
        for n in p.dead_ns
        for auxk in (True, False)
        for tr in (True, False)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--only", default=",".join(EXPERIMENTS), help="comma-separated: " + ",".join(EXPERIMENTS))
    parser.add_argument("--work", default=None, help="runs.jsonl and saved SAEs (default runs/paper/<preset>)")
    parser.add_argument("--out", default="docs/paper", help="tables and plots")
    args = parser.parse_args(argv)
    only = [e.strip() for e in args.only.split(",") if e.strip()]
    unknown = sorted(set(only) - set(EXPERIMENTS))
    if unknown:
        print(f"error: unknown experiments {unknown}; choose from {', '.join(EXPERIMENTS)}", file=sys.stderr)
        return 2
    p = PRESETS[args.preset]
    work = args.work or os.path.join(ROOT, "runs", "paper", args.preset)
    os.makedirs(work, exist_ok=True)
    needs_large = "scaling" in only or "metrics" in only
    for cache in [SMALL_CACHE] + ([LARGE_CACHE] if needs_large else []):
        if not os.path.exists(os.path.join(ROOT, cache, "manifest.json")):
            tokens = "1000000" if cache == LARGE_CACHE else "150000"
            print(
                f"error: no cache at {cache}; build it: python jobs/cache.py max_tokens={tokens} output={cache}",
                file=sys.stderr,
            )
            return 2
    ledger = Ledger(work)
    torch.manual_seed(0)
    start = time.perf_counter()
    if "lr" in only:
        run_all(lr_runs(p), ledger, work)
    if "frontier" in only:
        rows = run_all(frontier_runs(p, ledger, work), ledger, work)
        for row in rows:
            if "kl" not in row:
                row["kl"] = evaluate(row, work, full=False, windows=p.eval_windows)["downstream"]["kl_clean_to_spliced"]
                ledger.add(row)
    if "progressive" in only:
        run_all(progressive_runs(p), ledger, work)
    if "scaling" in only:
        run_all(scaling_runs(p), ledger, work)
    if "dead" in only:
        run_all(dead_runs(p), ledger, work)
    if "metrics" in only:
        rows = [ledger.get(r) for r in scaling_runs(p) if r.k == p.metrics_k]
        for row in best([r for r in rows if r], ("n", "k", "seed")).values():
            if "eval" not in row:
                row["eval"] = _eval_summary(evaluate(row, work, full=True, windows=p.eval_windows))
                ledger.add(row)
    if "report" in only:
        from saescale.sweeps.paper_report import write_report

        write_report(list(ledger.rows.values()), os.path.join(ROOT, args.out), args.preset)
    print0(f"paper: done in {time.perf_counter() - start:.0f} s; results in {work}/runs.jsonl")
    return 0


def _eval_summary(result: dict) -> dict:
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


if __name__ == "__main__":
    sys.exit(main())
