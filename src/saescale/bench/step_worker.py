"""Child process of `saescale bench step`: times one kind of step and reports its own peak memory.

Each kind runs in a fresh process so that one measurement's allocations never inflate another's
peak memory. Usage: python -m saescale.bench.step_worker '<json spec>'

The `step` kind runs in two phases. Phase 1 interleaves the same-precision floor (the step's own
encoder GEMM + top-k, chunked like the step, into the step's own buffer: no extra memory) with
the step, and records the peak memory. Only then, in low precision, phase 2 allocates a float32
chunk buffer and interleaves the float32 floor with the step, so the float32 comparison never
shows in the peak. On CUDA every timed region is bracketed by `torch.cuda.synchronize()`.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from saescale.core.config import NEVER_DEAD, SAEConfig, TrainConfig
from saescale.core.model import TopKSAE
from saescale.core.reference import dense_losses
from saescale.train.dead_latents import DeadLatentTracker
from saescale.train.graphs import CompiledStep, resolve_cuda_graphs
from saescale.train.host_sync import HostSyncAudit
from saescale.train.optim import make_adam, remove_parallel_grad_
from saescale.train.precision import Precision
from saescale.train.step import SparseTopKStep, low_precision_candidates, sync_free_setting

Fn = Callable[[], None]


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def device_of(spec: dict[str, Any]) -> torch.device:
    """The device named by --device; a clear error when CUDA is asked for but absent."""
    name = spec.get("device", "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "saescale bench step: --device cuda but torch sees no CUDA device; "
            "install a CUDA torch (make install TORCH=torch) or use --device cpu"
        )
    return torch.device(name)


def synchronizer(device: torch.device) -> Fn:
    """What ends a timed region: waiting for the GPU's queued kernels (nothing on CPU)."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def timed(fn: Fn, sync: Fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def build(spec: dict[str, Any], device: torch.device) -> tuple[TopKSAE, torch.Tensor, torch.Tensor]:
    """The SAE, a batch and the planted dead latents, all on `device` (drawn from seeded CPU
    generators, so CPU and CUDA runs see the same numbers)."""
    cfg = SAEConfig(
        d_in=spec["d_in"],
        n_latents=spec["n_latents"],
        k=spec["k"],
        multi_topk=spec.get("multi_topk", False),
        auxk_coef=(1 / 32) if spec["auxk"] else 0.0,
        normalization="none",
        aux_precision=spec.get("aux_precision", "auto"),
        architecture=spec.get("architecture", "topk"),
        l1_coef=spec.get("l1_coef", 0.0),
    )
    sae = TopKSAE(cfg, device=device)
    sae.reset_parameters_seeded(0)
    g = torch.Generator().manual_seed(0)
    n_dead = int(round(spec["dead_fraction"] * cfg.n_latents))
    dead = torch.randperm(cfg.n_latents, generator=g)[:n_dead].to(device)
    with torch.no_grad():
        # dead latents: kept out of the main top-k by a negative bias, but with a tail of
        # positive pre-activations (~2% of tokens) for AuxK to model, as in a real run
        sae.b_enc[dead] = spec.get("dead_bias", -2.0)
    x = torch.randn(spec["batch"], cfg.d_in, generator=g).to(device)
    return sae, x, dead


def chunk_slices(step: SparseTopKStep, batch: int) -> list[slice]:
    """The step's micro-batches (rows per chunk from the step itself)."""
    rows = step.chunk_rows(batch)
    return [slice(lo, min(lo + rows, batch)) for lo in range(0, batch, rows)]


def step_width(sae: TopKSAE) -> int:
    return sae.cfg.multi_k if sae.cfg.multi_topk else sae.cfg.k


def same_precision_floor(step: SparseTopKStep, x: torch.Tensor) -> Fn:
    """The step's floor in its own dtype: the low-precision weight copy, then per micro-batch
    `encode_chunk` and the top-k width the step takes there (its candidates in low precision),
    into the step's own pre-activation buffer."""
    sae, slices = step.sae, chunk_slices(step, x.shape[0])
    width = step_width(sae)
    width = min(low_precision_candidates(width) if step.precision.low else width, sae.cfg.n_latents)

    @torch.no_grad()
    def floor() -> None:
        xc = x - sae.b_pre
        step.refresh_low_precision_()
        for rows in slices:
            pre = step.encode_chunk(xc[rows])
            if step.precision.low:
                step.candidates(pre, width)  # the step's own low-precision selection
            else:
                pre.topk(width, dim=1, sorted=False)

    return floor


def fp32_floor(step: SparseTopKStep, x: torch.Tensor) -> Fn:
    """The same chunked GEMM + top-k in float32 (allocates a float32 chunk buffer: phase 2 only)."""
    sae, slices = step.sae, chunk_slices(step, x.shape[0])
    n = sae.cfg.n_latents
    width = min(step_width(sae), n)
    buf = torch.empty(step.chunk_rows(x.shape[0]), n, device=x.device, dtype=torch.float32)

    @torch.no_grad()
    def floor() -> None:
        xc = x - sae.b_pre
        for rows in slices:
            out = buf[: rows.stop - rows.start]
            torch.addmm(sae.b_enc, xc[rows], sae.W_enc.t(), out=out).topk(width, dim=1, sorted=False)

    return floor


def encoder_gemm(step: SparseTopKStep, x: torch.Tensor) -> Fn:
    """The floor's GEMM alone (every micro-batch's `encode_chunk`, no top-k)."""
    sae, slices = step.sae, chunk_slices(step, x.shape[0])

    @torch.no_grad()
    def gemm() -> None:
        xc = x - sae.b_pre
        for rows in slices:
            step.encode_chunk(xc[rows])

    return gemm


SQUARE_GEMM = {"cuda": 8192, "cpu": 2048}  # a GEMM large enough to run near the device's peak


def square_gemm_flops(device: torch.device, dtype: torch.dtype, repeats: int, sync: Fn) -> float:
    """FLOP/s of a large square GEMM in `dtype` on `device` (the best of `repeats`): the rate the
    encoder GEMM is held against (`gemm_fraction_of_peak`), measured in the same run."""
    size = SQUARE_GEMM.get(device.type, 2048)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up
    best = min(timed(lambda: torch.mm(a, b, out=out), sync) for _ in range(max(2, repeats)))
    return 2 * size**3 / best


def interleave(floor: Fn, train_step: Fn, repeats: int, sync: Fn) -> tuple[list[float], list[float]]:
    """(floor times, step times), each step timed just after its floor (noise hits both alike)."""
    floor_times, step_times = [], []
    for _ in range(repeats):
        floor_times.append(timed(floor, sync))
        step_times.append(timed(train_step, sync))
    return floor_times, step_times


def peak_device_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def run_step(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    sae, x, dead = build(spec, device)
    cfg = sae.cfg
    threshold = NEVER_DEAD  # the dead set is planted by hand each step below, never by the tracker
    tracker = DeadLatentTracker(cfg.n_latents, threshold, device)
    precision = Precision.make(spec.get("precision", "fp32"), device)
    step = SparseTopKStep(
        sae,
        1.0,
        tracker,
        precision=precision,
        micro_batches=spec.get("micro_batches", 1),
        sync_free=sync_free_setting(spec.get("sync_free", "auto")),
        kernels=spec.get("kernels", "auto"),
    )
    opt = make_adam([sae.W_enc, sae.b_enc, sae.W_dec, sae.b_pre], TrainConfig(), lr=1e-4)
    sync = synchronizer(device)
    compiled = CompiledStep(step) if resolve_cuda_graphs(spec.get("cuda_graphs", "off"), step) else None
    warmup = spec["warmup"] if compiled is None else max(spec["warmup"], 5)  # compile, then record

    def train_step(eager: bool = False) -> None:
        tracker.tokens_since_fired[dead] = threshold
        width = step.aux_width()
        if compiled is not None and width is not None and not eager:
            compiled(x, width)
        else:
            stats = step.run(x, False, width)  # as the trainer does on non-logging steps
            step.finish(stats)
        remove_parallel_grad_(sae.W_dec, sae.W_dec.grad)
        opt.step()
        sae.normalize_decoder_()

    floor = same_precision_floor(step, x)
    for _ in range(warmup):
        train_step()
        floor()
    floor_times, step_times = interleave(floor, train_step, spec["repeats"], sync)
    # one more step, its host reads counted (untimed: the audit is slow; eager: a compiler
    # cannot run under the audit's dispatch mode, and the compiled step is the same code)
    with HostSyncAudit() as audit:
        train_step(eager=True)
    result = {
        "kind": "step",
        "sync_free": step.sync_free,
        "kernels": step.ops.name,
        "compiled": compiled is not None,
        "host_syncs": sum(audit.syncs.values()),  # ops that make the host wait for the device
        "host_sync_ops": dict(audit.syncs),
        "aux_path": step.last_aux_path,
        "precision": precision.name,
        "micro_batches": step.micro_batches,
        "chunk_rows": step.chunk_rows(x.shape[0]),
        "median_s": statistics.median(step_times),
        "floor_median_s": statistics.median(floor_times),
        "times_s": step_times,
        "floor_times_s": floor_times,
        "peak_rss_bytes": peak_rss_bytes(),  # before phase 2's float32 buffer exists
        "peak_device_bytes": peak_device_bytes(device),
    }
    # the encoder GEMM's achieved rate against a large square GEMM's, same dtype, same run
    gemm = encoder_gemm(step, x)
    gemm_s = statistics.median(timed(gemm, sync) for _ in range(spec["repeats"]))
    gemm_flops = 2 * x.shape[0] * cfg.d_in * cfg.n_latents / gemm_s
    square = square_gemm_flops(device, step.compute_dtype, spec["repeats"], sync)
    result.update(gemm_s=gemm_s, gemm_flops=gemm_flops, square_gemm_flops=square)
    if precision.low:  # phase 2: the float32 floor, with a buffer of its own
        floor32 = fp32_floor(step, x)
        floor32()  # first touch of the new buffer
        result["fp32_floor_times_s"], result["fp32_step_times_s"] = interleave(
            floor32, train_step, spec["repeats"], sync
        )
    else:
        result["fp32_floor_times_s"], result["fp32_step_times_s"] = floor_times, step_times
    return result


def run_naive(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The dense autograd step (float32 whatever --precision says)."""
    sae, x, dead = build(spec, device)
    cfg = sae.cfg
    params = dict(sae.named_parameters())
    opt = torch.optim.Adam(list(params.values()), lr=1e-4, eps=6.25e-10)
    dead_mask = torch.zeros(cfg.n_latents, dtype=torch.bool, device=device)
    dead_mask[dead] = True
    sync = synchronizer(device)

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
    times = [timed(naive_step, sync) for _ in range(spec["repeats"])]
    return {
        "kind": "naive",
        "median_s": statistics.median(times),
        "times_s": times,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_device_bytes": peak_device_bytes(device),
    }


def run_peer(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A peer's own training step (`bench.peer_steps`) on the same batch and planted dead set."""
    from saescale.bench.peer_steps import peer_step

    sae, x, dead = build(spec, device)
    step = peer_step(spec["peer"], sae, x, dead, spec)
    sync = synchronizer(device)
    for _ in range(spec["warmup"]):
        step()
    times = [timed(step, sync) for _ in range(spec["repeats"])]
    return {
        "kind": "peer",
        "peer": spec["peer"],
        "median_s": statistics.median(times),
        "times_s": times,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_device_bytes": peak_device_bytes(device),
    }


def run(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(spec["threads"])
    device = device_of(spec)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if spec["kind"] == "step":
        return run_step(spec, device)
    if spec["kind"] == "naive":
        return run_naive(spec, device)
    if spec["kind"] == "peer":
        return run_peer(spec, device)
    raise ValueError(f"unknown kind {spec['kind']!r}")


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
