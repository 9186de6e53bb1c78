"""Child process of `saescale bench step`: times one kind of step and reports its own peak RSS.

Each kind runs in a fresh process so that one measurement's allocations never inflate another's
peak memory. Usage: python -m saescale.bench.step_worker '<json spec>'
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time

import torch

from saescale.core.config import NEVER_DEAD, SAEConfig, TrainConfig
from saescale.core.model import TopKSAE
from saescale.core.reference import dense_losses
from saescale.train.dead_latents import DeadLatentTracker
from saescale.train.optim import make_adam, remove_parallel_grad_
from saescale.train.step import SparseTopKStep


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def build(spec: dict) -> tuple[TopKSAE, torch.Tensor, torch.Tensor]:
    cfg = SAEConfig(
        d_in=spec["d_in"],
        n_latents=spec["n_latents"],
        k=spec["k"],
        multi_topk=spec.get("multi_topk", False),
        auxk_coef=(1 / 32) if spec["auxk"] else 0.0,
        normalization="none",
        aux_precision=spec.get("aux_precision", "auto"),
    )
    g = torch.Generator().manual_seed(0)
    sae = TopKSAE(cfg)
    sae.reset_parameters(generator=g)
    n_dead = int(round(spec["dead_fraction"] * cfg.n_latents))
    dead = torch.randperm(cfg.n_latents, generator=g)[:n_dead]
    with torch.no_grad():
        # dead latents: kept out of the main top-k by a negative bias, but with a tail of
        # positive pre-activations (~2% of tokens) for AuxK to model, as in a real run
        sae.b_enc[dead] = spec.get("dead_bias", -2.0)
    x = torch.randn(spec["batch"], cfg.d_in, generator=g)
    return sae, x, dead


def run(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    sae, x, dead = build(spec)
    cfg = sae.cfg
    kind = spec["kind"]
    threshold = NEVER_DEAD  # the dead set is planted by hand each step below, never by the tracker
    if kind == "step":
        tracker = DeadLatentTracker(cfg.n_latents, threshold)
        step = SparseTopKStep(sae, mse_scale=1.0, tracker=tracker)
        params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_pre]
        opt = make_adam(params, TrainConfig(), lr=1e-4)

        def train_step() -> None:
            tracker.tokens_since_fired[dead] = threshold
            step(x, compute_fvu=False)  # as the trainer does on non-logging steps
            remove_parallel_grad_(sae.W_dec, sae.W_dec.grad)
            opt.step()
            sae.normalize_decoder_()

        def floor() -> None:
            # the same GEMM + top-k, into the step's own pre-activation buffer (no extra memory)
            pre = step.pre_buffer(x.shape[0])
            torch.addmm(sae.b_enc.detach(), x - sae.b_pre.detach(), sae.W_enc.detach().t(), out=pre)
            pre.topk(cfg.k, dim=1, sorted=False)

        for _ in range(spec["warmup"]):
            train_step()
            floor()
        step_times, floor_times = [], []
        for _ in range(spec["repeats"]):  # interleaved, so machine noise hits both alike
            t0 = time.perf_counter()
            floor()
            t1 = time.perf_counter()
            train_step()
            t2 = time.perf_counter()
            floor_times.append(t1 - t0)
            step_times.append(t2 - t1)
        return {
            "kind": kind,
            "median_s": statistics.median(step_times),
            "floor_median_s": statistics.median(floor_times),
            "times_s": step_times,
            "floor_times_s": floor_times,
            "peak_rss_bytes": peak_rss_bytes(),
        }
    if kind == "naive":
        params = {n: p for n, p in sae.named_parameters()}
        opt = torch.optim.Adam(list(params.values()), lr=1e-4, eps=6.25e-10)
        dead_mask = torch.zeros(cfg.n_latents, dtype=torch.bool)
        dead_mask[dead] = True

        def naive_step() -> None:
            opt.zero_grad(set_to_none=True)
            out = dense_losses(params, x, cfg, 1.0, dead_mask if spec["auxk"] and len(dead) else None)
            out["loss"].backward()
            with torch.no_grad():
                w, g = sae.W_dec, sae.W_dec.grad
                g -= (g * w).sum(1, keepdim=True) * w
            opt.step()
            sae.normalize_decoder_()

        for _ in range(spec["warmup"]):
            naive_step()
        times = []
        for _ in range(spec["repeats"]):
            t0 = time.perf_counter()
            naive_step()
            times.append(time.perf_counter() - t0)
        return {
            "kind": kind,
            "median_s": statistics.median(times),
            "times_s": times,
            "peak_rss_bytes": peak_rss_bytes(),
        }
    raise ValueError(f"unknown kind {kind!r}")


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
