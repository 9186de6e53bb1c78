"""`saescale bench step`: one full optimiser step (forward, backward, decoder normalisation, Adam)
against the floor (encoder GEMM + top-k alone) and a naive dense implementation, in one run.

The step runs in a child process of its own, so its peak memory is its own; the floor is timed
in the same child, interleaved with the steps and into the step's own pre-activation buffer (so
it adds no memory); the naive step runs in another child. Dead latents (--dead-fraction) get a
bias of -2: they never reach the main top-k but keep a tail of positive pre-activations for
AuxK, as in a real run. Prints one JSON object.

`--precision` (default fp32, so numbers keep their meaning across versions) sets the step's
compute dtype and `--micro-batches` its row chunks; the floor follows both (`floor_s`), and
`floor_fp32_s` is the float32 floor with the same chunks (timed after the peak memory is
taken, see `step_worker`). `--device cuda` runs the same code on the GPU and reports
`torch.cuda.max_memory_allocated` as the peak. `--peers sparsify` also times the peer's own
training step (`bench.peer_steps` says what it includes) in a child of its own, on the same
batch, and reports `peer_over_step` (its median step over saescale's).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from typing import Any

MB = 2**20
RUNTIME_SLACK = 300 * MB  # the interpreter, torch's libraries and small buffers (host RSS only)
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def run_worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "saescale.bench.step_worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["(no output)"]
        if lines[-1].startswith("saescale"):  # the worker's own one-line message (bad input)
            raise RuntimeError(lines[-1].removeprefix("saescale bench step: "))
        raise RuntimeError(f"bench worker {spec['kind']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def chunk_rows(batch: int, micro_batches: int) -> int:
    """Rows per micro-batch, as `SparseTopKStep.chunk_rows` computes them."""
    return -(-batch // micro_batches)


def preact_bytes(n_latents: int, batch: int, precision: str = "fp32", micro_batches: int = 1) -> int:
    """One micro-batch's [chunk rows, n] pre-activation in the compute dtype."""
    return chunk_rows(batch, micro_batches) * n_latents * ELEMENT_BYTES[precision]


def memory_model_bytes(
    d_in: int,
    n_latents: int,
    batch: int,
    precision: str = "fp32",
    micro_batches: int = 1,
    slack: int = RUNTIME_SLACK,
) -> int:
    """params + grads + Adam (2 moments) in fp32, one micro-batch's pre-activation in the
    compute dtype, the low-precision copy of W_enc and b_enc, and `slack`."""
    params = 2 * n_latents * d_in + n_latents + d_in
    e = ELEMENT_BYTES[precision]
    low_copy = (n_latents * d_in + n_latents) * e if e < 4 else 0
    return 4 * (4 * params) + preact_bytes(n_latents, batch, precision, micro_batches) + low_copy + slack


def paired_ratio(steps: list[float], floors: list[float]) -> float:
    """Median of per-pair ratios: each step against the floor timed just before it."""
    return statistics.median(s / f for s, f in zip(steps, floors))


def _check(dead_fraction: float, precision: str, micro_batches: int, batch: int, device: str) -> None:
    if not 0.0 <= dead_fraction < 1.0:
        raise ValueError(f"--dead-fraction must be in [0, 1), got {dead_fraction}")
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not 1 <= micro_batches <= batch:
        raise ValueError(f"--micro-batches must be between 1 and --batch ({batch}), got {micro_batches}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")


def _memory_fields(step: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """Peak memory against the model: host RSS on CPU, `max_memory_allocated` on CUDA (whose
    model leaves out the host-side slack)."""
    d_in, n, batch = spec["d_in"], spec["n_latents"], spec["batch"]
    precision, micro = step["precision"], step["micro_batches"]
    cuda = step.get("peak_device_bytes") is not None
    model = memory_model_bytes(d_in, n, batch, precision, micro, slack=0 if cuda else RUNTIME_SLACK)
    out: dict[str, Any] = {
        "peak_rss_mb": round(step["peak_rss_bytes"] / MB, 1),
        "memory_model_mb": round(model / MB, 1),
        "preact_mb": round(preact_bytes(n, batch, precision, micro) / MB, 1),
    }
    if cuda:
        out["peak_cuda_mb"] = round(step["peak_device_bytes"] / MB, 1)
        out["peak_cuda_over_model"] = round(step["peak_device_bytes"] / model, 3)
    else:
        out["peak_rss_over_model"] = round(step["peak_rss_bytes"] / model, 3)
    return out


def bench_step(
    d_in: int,
    n_latents: int,
    k: int,
    batch: int,
    auxk: bool = True,
    dead_fraction: float = 0.0,
    multi_topk: bool = False,
    naive: bool = True,
    threads: int = 2,
    warmup: int = 2,
    repeats: int = 7,
    aux_precision: str = "auto",
    precision: str = "fp32",
    micro_batches: int = 1,
    device: str = "cpu",
    timeout: float = 1800,
    architecture: str = "topk",
    l1_coef: float = 0.01,
    peers: tuple[str, ...] = (),
    sync_free: str = "auto",
    kernels: str = "auto",
    cuda_graphs: str = "off",
) -> dict[str, Any]:
    from saescale.bench.peer_steps import PEERS
    from saescale.core.config import SAEConfig
    from saescale.train.step import sync_free_setting

    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise ValueError(f"--peers: unknown {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    if peers and architecture != "topk":
        raise ValueError("--peers times TopK steps: leave --architecture at topk")

    l1_coef = l1_coef if architecture == "relu" else 0.0
    SAEConfig(  # fail fast on bad sizes
        d_in=d_in, n_latents=n_latents, k=k, multi_topk=multi_topk, architecture=architecture, l1_coef=l1_coef
    )
    _check(dead_fraction, precision, micro_batches, batch, device)
    spec = dict(
        d_in=d_in,
        n_latents=n_latents,
        k=k,
        batch=batch,
        auxk=auxk,
        dead_fraction=dead_fraction,
        multi_topk=multi_topk,
        threads=threads,
        warmup=warmup,
        repeats=repeats,
        aux_precision=aux_precision,
        precision=precision,
        micro_batches=micro_batches,
        device=device,
        architecture=architecture,
        l1_coef=l1_coef,
        sync_free=sync_free,
        kernels=kernels,
        cuda_graphs=cuda_graphs,
    )
    sync_free_setting(sync_free)  # fail fast on a bad value
    step = run_worker({**spec, "kind": "step"}, timeout)
    floor_fp32_s = statistics.median(step["fp32_floor_times_s"])
    result: dict[str, Any] = {
        "bench": "step",
        "config": spec,
        "device": device,
        "precision": step["precision"],
        "micro_batches": step["micro_batches"],
        # train.sync_free, and the host-synchronising ops one step ran (`train.host_sync`)
        "sync_free": step["sync_free"],
        "kernels": step["kernels"],
        "cuda_graphs": step["compiled"],  # the step ran compiled (train.cuda_graphs)
        "host_syncs_per_step": step["host_syncs"],
        "host_sync_ops": step["host_sync_ops"],
        "aux_path": step["aux_path"],
        "step_s": round(step["median_s"], 4),
        "tokens_per_s": round(batch / step["median_s"], 1),
        "floor_s": round(step["floor_median_s"], 4),
        "floor_fp32_s": round(floor_fp32_s, 4),
        "step_over_floor": round(paired_ratio(step["times_s"], step["floor_times_s"]), 3),
        # the encoder GEMM alone: achieved rate, and its fraction of a large square GEMM's rate
        # in the same dtype on the same device, measured in this run
        "gemm_s": round(step["gemm_s"], 4),
        "gemm_tflops": round(step["gemm_flops"] / 1e12, 4),
        "square_gemm_tflops": round(step["square_gemm_flops"] / 1e12, 4),
        "gemm_fraction_of_peak": round(step["gemm_flops"] / step["square_gemm_flops"], 3),
        "step_over_fp32_floor": round(paired_ratio(step["fp32_step_times_s"], step["fp32_floor_times_s"]), 3),
        "step_times_s": [round(t, 4) for t in step["times_s"]],
        "floor_times_s": [round(t, 4) for t in step["floor_times_s"]],
        **_memory_fields(step, spec),
    }
    if step["precision"] != "fp32":
        result["fp32_floor_times_s"] = [round(t, 4) for t in step["fp32_floor_times_s"]]
        result["fp32_step_times_s"] = [round(t, 4) for t in step["fp32_step_times_s"]]
    for peer in peers:  # each peer's own step, in a child of its own, on the same batch
        theirs = run_worker({**spec, "kind": "peer", "peer": peer}, timeout)
        result.setdefault("peers", {})[peer] = {
            "step_s": round(theirs["median_s"], 4),
            "tokens_per_s": round(batch / theirs["median_s"], 1),
            "peer_over_step": round(theirs["median_s"] / step["median_s"], 3),
            "peak_rss_mb": round(theirs["peak_rss_bytes"] / MB, 1),
            "times_s": [round(t, 4) for t in theirs["times_s"]],
        }
    if naive:
        dense = run_worker({**spec, "kind": "naive", "repeats": max(2, repeats // 2)}, timeout)
        result["naive_s"] = round(dense["median_s"], 4)
        result["naive_over_step"] = round(dense["median_s"] / step["median_s"], 2)
        result["naive_peak_rss_mb"] = round(dense["peak_rss_bytes"] / MB, 1)
    return result
