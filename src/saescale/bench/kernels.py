"""`saescale bench kernels`: each sparse product of the TopK step, embedding_bag (`kernels.sparse`)
against Triton (`kernels.triton_sparse`), on the same tensors in the same run.

The decision it informs is issue 21's: adopt a Triton kernel only where it wins on the GPU
(`train.sparse_kernels`). Reported per product: both medians, `triton_over_torch` (below 1:
Triton is faster) and the largest difference between their outputs. The torch weight gradient is
timed both ways the step calls it: `chunked` (row chunks, reads the offsets on the host: the
synchronising step) and `whole` (one call: the sync-free step). On a CPU Triton runs only
through its interpreter (TRITON_INTERPRET=1: correct, far slower, not a timing), so there
the Triton side is reported as skipped unless that is set.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from saescale.kernels import sparse

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _median_s(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_kernels(
    d_in: int,
    n_latents: int,
    k: int,
    batch: int,
    device: str = "cuda",
    dtype: str = "float32",
    repeats: int = 20,
    warmup: int = 3,
) -> dict[str, Any]:
    from saescale.kernels import triton_sparse

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("saescale bench kernels: --device cuda but torch sees no CUDA device")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    triton_why_not = None
    if not triton_sparse.available():
        triton_why_not = "triton is not installed (the `kernels` extra)"
    elif dev.type != "cuda" and not interpreted:
        triton_why_not = "Triton needs a CUDA device (or TRITON_INTERPRET=1: a correctness run, not a timing)"

    g = torch.Generator().manual_seed(0)
    idx = torch.rand(batch, n_latents, generator=g).topk(k, dim=1).indices if n_latents <= 2**16 else None
    if idx is None:  # large n: random distinct-enough latents without a [batch, n] tensor
        idx = torch.randint(0, n_latents, (batch, k), generator=g)
    wdtype = DTYPES[dtype]
    idx = idx.to(dev)
    values = torch.rand(batch, k, generator=g).to(dev)
    weight = torch.randn(n_latents, d_in, generator=g).to(dev, wdtype)
    dense = torch.randn(batch, d_in, generator=g).to(dev, wdtype)
    order = sparse.LatentOrder(idx, n_latents)
    out = torch.empty(n_latents, d_in, device=dev, dtype=wdtype)  # the weight gradients' buffer
    whole_fits = sparse.whole_bag_fits(idx.numel(), d_in)
    # the weight gradients are compared on the rows of up to 4096 touched latents (a whole
    # [n, d] float32 copy per implementation would not fit a GPU at 2^20 x 4096)
    rows = idx.reshape(-1).unique()[:4096]

    products: dict[str, dict[str, Callable[[], Any]]] = {
        "decode": {"torch": lambda: sparse.sparse_decode(idx, values, weight)},
        "values_grad": {"torch": lambda: sparse.values_grad(idx, weight, dense)},
        "rows_by_latent": {"torch": lambda: sparse.rows_by_latent_(out, order, values, dense)},
        "rows_by_latent_accumulate": {  # (the timing includes zeroing the buffer first)
            "torch": lambda: sparse.rows_by_latent_(out.zero_(), order, values, dense, accumulate=True)
        },
    }
    if whole_fits:
        products["rows_by_latent"]["torch_whole"] = lambda: sparse.rows_by_latent_(
            out, order, values, dense, sync_free=True
        )
    if triton_why_not is None:
        products["decode"]["triton"] = lambda: triton_sparse.decode(idx, values, weight)
        products["values_grad"]["triton"] = lambda: triton_sparse.values_grad(idx, weight, dense)
        products["rows_by_latent"]["triton"] = lambda: triton_sparse.rows_by_latent_order_(out, order, values, dense)
        products["rows_by_latent_accumulate"]["triton"] = lambda: triton_sparse.rows_by_latent_order_(
            out.zero_(), order, values, dense, accumulate=True
        )

    result: dict[str, Any] = {
        "bench": "kernels",
        "config": dict(d_in=d_in, n_latents=n_latents, k=k, batch=batch, device=device, dtype=dtype),
        "triton": triton_why_not
        or ("interpreted (not a timing)" if interpreted and dev.type != "cuda" else "compiled"),
        "products": {},
    }
    for name, impls in products.items():
        # each output as soon as it is made (the weight gradients share one buffer): small
        # outputs whole, a weight gradient's sampled rows
        outputs = {}
        for impl, fn in impls.items():
            value = fn()
            outputs[impl] = (value[rows] if value.shape[0] == n_latents else value).float()
        times = {impl: _median_s(fn, repeats, warmup, dev) for impl, fn in impls.items()}
        line: dict[str, Any] = {f"{impl}_s": round(t, 6) for impl, t in times.items()}
        reference = outputs["torch"]
        scale = reference.abs().max().item() or 1.0
        for impl, value in outputs.items():
            if impl != "torch":
                line[f"{impl}_max_rel_diff"] = float(f"{(value - reference).abs().max().item() / scale:.3g}")
        del outputs, reference
        if "triton" in times:
            best_torch = min(t for impl, t in times.items() if impl.startswith("torch"))
            line["triton_over_torch"] = round(times["triton"] / best_torch, 3)
        result["products"][name] = line
    return result
