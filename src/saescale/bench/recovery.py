"""`saescale bench recovery`: train on data from a known sparse dictionary and report how many
true atoms the decoder recovered, the NMSE and the dead fraction, with the AuxK loss and the
transpose init switchable (the ablations of the paper's dead-latent section)."""

from __future__ import annotations

import time
from typing import Any

import torch

from saescale.core.config import SAEConfig, TrainConfig
from saescale.core.model import TopKSAE
from saescale.core.synthetic import SparseDictionary
from saescale.evaluation.reconstruction import nmse
from saescale.train.trainer import Trainer

# the setting of tests/test_training.py::test_recovers_a_known_sparse_dictionary (which trains 800 steps)
SETTING = dict(d=64, n_atoms=256, active=4, noise=0.01, n_latents=384, k=8, batch=1024, steps=1500, lr=2e-3)


def bench_recovery(
    auxk: bool = True, transpose_init: bool = True, seed: int = 0, steps: int | None = None
) -> dict[str, Any]:
    """`steps` (default: the setting's 1500) shortens the run (the test takes 800)."""
    s = SETTING if steps is None else {**SETTING, "steps": steps}
    truth = SparseDictionary.random(s["d"], s["n_atoms"], s["active"], s["noise"], seed=seed)
    cfg = SAEConfig(
        d_in=s["d"],
        n_latents=s["n_latents"],
        k=s["k"],
        dead_tokens_threshold=20 * s["batch"],
        auxk_coef=(1 / 32) if auxk else 0.0,
    )
    sae = TopKSAE(cfg)
    trainer = Trainer(sae, TrainConfig(lr=s["lr"], log_every=100, init_transpose=transpose_init, seed=seed))
    t0 = time.perf_counter()
    trainer.fit(truth.batches(s["batch"], s["steps"]))
    held_out = truth.sample(8192, torch.Generator().manual_seed(123))
    with torch.no_grad():
        recon = sae(held_out)
    error = nmse(recon, held_out)
    return {
        "bench": "recovery",
        "auxk": auxk,
        "transpose_init": transpose_init,
        "setting": s,
        "recovered_frac": truth.recovery(sae.W_dec.detach()),
        "heldout_nmse": round(error, 4),
        "dead_fraction": trainer.tracker.dead_fraction(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
