"""`saescale bench precision`: does a low-precision run train as well as float32?

The same short run (same synthetic data from a known sparse dictionary, same seed, same init)
is trained through `Trainer` once in fp32 and once per requested precision; each reports its
held-out NMSE (evaluated in float32), dead fraction and compute seconds per step, and every
low-precision run its `nmse_drift` = (nmse_p - nmse_fp32) / nmse_fp32. Dead latents are
counted over a short window (`dead_steps` batches) so AuxK, and its low-precision path, is
exercised within the run. Prints one JSON object.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from saescale.core.config import SAEConfig, TrainConfig
from saescale.core.model import TopKSAE
from saescale.core.synthetic import SparseDictionary
from saescale.evaluation.reconstruction import nmse
from saescale.train.trainer import Trainer


@dataclass(frozen=True)
class Setting:
    """Sized to finish in about a minute per precision pair on 2 CPU cores."""

    d_in: int = 128
    n_latents: int = 4096
    k: int = 32
    batch: int = 1024
    steps: int = 600
    n_atoms: int = 2048
    active: int = 16
    noise: float = 0.01
    lr: float = 1e-3
    dead_steps: int = 20  # a latent silent for this many batches is dead (AuxK works on it)
    micro_batches: int = 1
    heldout: int = 8192
    seed: int = 0

    def validate(self) -> None:
        for name in ("d_in", "n_latents", "k", "batch", "steps", "n_atoms", "active", "dead_steps", "heldout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.active > self.n_atoms:
            raise ValueError(f"--active ({self.active}) cannot exceed --n-atoms ({self.n_atoms})")
        if not 1 <= self.micro_batches <= self.batch:
            raise ValueError(f"--micro-batches must be between 1 and --batch ({self.batch}), got {self.micro_batches}")


def train_once(s: Setting, precision: str, device: torch.device) -> tuple[dict[str, Any], float]:
    """One run at `precision` (its report, and its unrounded held-out NMSE); the data, init
    and seed depend only on `s`."""
    truth = SparseDictionary.random(s.d_in, s.n_atoms, s.active, s.noise, seed=s.seed)
    cfg = SAEConfig(d_in=s.d_in, n_latents=s.n_latents, k=s.k, dead_tokens_threshold=s.dead_steps * s.batch)
    sae = TopKSAE(cfg, device=device)
    train_cfg = TrainConfig(lr=s.lr, log_every=s.steps, seed=s.seed, precision=precision, micro_batches=s.micro_batches)
    trainer = Trainer(sae, train_cfg)
    t0 = time.perf_counter()
    summary = trainer.fit(truth.batches(s.batch, s.steps))
    wall = time.perf_counter() - t0
    held_out = truth.sample(s.heldout, torch.Generator().manual_seed(s.seed + 123)).to(device)
    with torch.no_grad():
        error = nmse(sae(held_out), held_out)
    run: dict[str, Any] = {
        "precision": trainer.precision.name,
        "heldout_nmse": round(error, 6),
        "dead_fraction": round(trainer.tracker.dead_fraction(), 4),
        "step_s": round(summary.totals.compute / max(summary.totals.steps, 1), 4),
        "wall_s": round(wall, 1),
    }
    if trainer.precision.scaler is not None:
        run["skipped_steps"] = trainer.precision.scaler.skipped_steps
    return run, error


def drift(value: float, reference: float) -> float:
    """Relative change against the float32 run (inf when that run is exact)."""
    if reference == 0:
        return 0.0 if value == 0 else math.inf
    return (value - reference) / reference


def bench_precision(
    precisions: tuple[str, ...] = ("bf16",),
    setting: Setting | None = None,
    device: str = "cpu",
    threads: int = 2,
) -> dict[str, Any]:
    s = setting or Setting()
    s.validate()
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA device; install a CUDA torch or use --device cpu")
    torch.set_num_threads(threads)
    dev = torch.device(device)
    reference, reference_nmse = train_once(s, "fp32", dev)
    runs = {"fp32": reference}
    drifts: dict[str, float] = {}
    for precision in precisions:
        run, error = train_once(s, precision, dev)
        run["nmse_drift"] = round(drift(error, reference_nmse), 4)
        label = precision if precision == run["precision"] else f"{precision}->{run['precision']}"
        runs[label] = run
        drifts[label] = run["nmse_drift"]
    return {"bench": "precision", "device": device, "setting": asdict(s), "runs": runs, "nmse_drift": drifts}
