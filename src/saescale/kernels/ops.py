"""Which implementation of the sparse products a step uses (`train.sparse_kernels`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from saescale.kernels import sparse


@dataclass(frozen=True)
class SparseOps:
    """The three products of a fixed-width TopK code (see `kernels.sparse`)."""

    name: str
    decode: Callable  # (indices, values, weight) -> [batch, d]
    values_grad: Callable  # (indices, weight, dense) -> [batch, k]
    rows_by_latent_: Callable  # (out, order, coeffs, dense, accumulate=False, sync_free=False) -> out


TORCH_OPS = SparseOps("torch", sparse.sparse_decode, sparse.values_grad, sparse.rows_by_latent_)


def sparse_ops(name: str) -> SparseOps:
    """torch (embedding_bag, any device; the default until a GPU measures Triton faster:
    `saescale bench kernels`) or triton (`kernels.triton_sparse`: CUDA, or the CPU through
    Triton's interpreter in tests)."""
    if name in ("auto", "torch"):
        return TORCH_OPS
    if name != "triton":
        raise ValueError(f"sparse kernels must be auto, torch or triton, got {name!r}")
    from saescale.kernels import triton_sparse

    if not triton_sparse.available():
        raise ValueError("train.sparse_kernels=triton needs the triton package: pip install 'saescale[kernels]'")
    return SparseOps("triton", triton_sparse.decode, triton_sparse.values_grad, triton_sparse.rows_by_latent_order_)
