"""Triton versions of the three sparse products of `kernels.sparse`, for CUDA devices.

Written from the maths (the design is OpenAI's and sparsify's: a gather decoder, and a weight
gradient from the entries sorted by latent), each checked against `kernels.sparse` and a dense
reference on the CPU through Triton's interpreter (`TRITON_INTERPRET=1`, tests/test_triton_kernels.py):

* `decode`:          x_hat[b]  = sum_j v[b, j] W[idx[b, j]]        one program per (token, column block)
* `values_grad`:     dv[b, j]  = dense[b] . W[idx[b, j]]           one program per token
* `rows_by_latent_`: out[i] (+)= sum over entries e of latent i of c[e] dense[row[e]]
                                                                   one program per (latent, column block)

Why a kernel and not embedding_bag: `rows_by_latent_` writes every row of a weight gradient
straight into the caller's buffer in one launch with no host read of the offsets (each program
reads its latent's first and last entry on the device), sums each row in entry order
(deterministic, no atomics) and, when accumulating, skips latents with no entry. Whether each
one beats embedding_bag on a given GPU is measured by `saescale bench kernels` (issue 21: adopt
a kernel only where it wins); `SparseTopKStep(kernels="triton")` uses them in the sync-free step.
Accumulation is in float32 whatever the tensors' dtype. Indices are 64-bit inside the kernels
(2^24 latents x d overflows 32 bits).
"""

from __future__ import annotations

import torch
from torch import Tensor

from saescale.kernels.sparse import LatentOrder

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without the `kernels` extra
    triton = None
    tl = None

BLOCK_D = 128  # columns per program: a 512-byte float32 row slice


def available() -> bool:
    """Whether Triton is installed (the `kernels` extra)."""
    return triton is not None


def _require() -> None:
    if triton is None:
        raise RuntimeError("Triton kernels need the triton package: pip install 'saescale[kernels]'")


if triton is not None:

    @triton.jit
    def _decode_kernel(idx_ptr, val_ptr, w_ptr, out_ptr, K, D, stride_w, BLOCK: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < D
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in range(K):
            latent = tl.load(idx_ptr + b * K + j).to(tl.int64)
            value = tl.load(val_ptr + b * K + j).to(tl.float32)
            row = tl.load(w_ptr + latent * stride_w + cols, mask=mask, other=0.0).to(tl.float32)
            acc += value * row
        tl.store(out_ptr + b * D + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _values_grad_kernel(
        idx_ptr, w_ptr, dense_ptr, out_ptr, K, D, stride_w, BLOCK_K: tl.constexpr, BLOCK: tl.constexpr
    ):
        b = tl.program_id(0).to(tl.int64)
        ks = tl.arange(0, BLOCK_K)
        kmask = ks < K
        latents = tl.load(idx_ptr + b * K + ks, mask=kmask, other=0).to(tl.int64)
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for start in range(0, D, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            cmask = cols < D
            x = tl.load(dense_ptr + b * D + cols, mask=cmask, other=0.0).to(tl.float32)
            w = tl.load(
                w_ptr + latents[:, None] * stride_w + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0
            ).to(tl.float32)
            acc += tl.sum(w * x[None, :], axis=1)
        tl.store(out_ptr + b * K + ks, acc.to(out_ptr.dtype.element_ty), mask=kmask)

    @triton.jit
    def _rows_by_latent_kernel(
        offsets_ptr,
        rows_ptr,
        coeff_ptr,
        dense_ptr,
        out_ptr,
        D,
        stride_dense,
        stride_out,
        ACCUMULATE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        latent = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < D
        first = tl.load(offsets_ptr + latent)
        end = tl.load(offsets_ptr + latent + 1)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for e in range(first, end):
            row = tl.load(rows_ptr + e).to(tl.int64)
            coeff = tl.load(coeff_ptr + e).to(tl.float32)
            acc += coeff * tl.load(dense_ptr + row * stride_dense + cols, mask=mask, other=0.0).to(tl.float32)
        target = out_ptr + latent * stride_out + cols
        if ACCUMULATE:
            # latents with no entry keep their rows untouched (and cost one offsets read)
            if end > first:
                old = tl.load(target, mask=mask, other=0.0).to(tl.float32)
                tl.store(target, (old + acc).to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(target, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _check_rows(t: Tensor, name: str) -> None:
    if t.dim() != 2 or t.stride(1) != 1:
        raise ValueError(f"{name} must be a 2-D tensor with contiguous rows, got shape {tuple(t.shape)}")


def decode(indices: Tensor, values: Tensor, weight: Tensor) -> Tensor:
    """x_hat[b] = sum_j values[b, j] * weight[indices[b, j]] (`kernels.sparse.sparse_decode`)."""
    _require()
    _check_rows(weight, "weight")
    batch, width = indices.shape
    d = weight.shape[1]
    out = torch.empty(batch, d, dtype=weight.dtype, device=weight.device)
    grid = (batch, triton.cdiv(d, BLOCK_D))
    _decode_kernel[grid](
        indices.contiguous(), values.contiguous(), weight, out, width, d, weight.stride(0), BLOCK=BLOCK_D
    )
    return out


def values_grad(indices: Tensor, weight: Tensor, dense: Tensor) -> Tensor:
    """dv[b, j] = dense[b] . weight[indices[b, j]] (`kernels.sparse.values_grad`)."""
    _require()
    _check_rows(weight, "weight")
    batch, width = indices.shape
    d = weight.shape[1]
    dense = dense.contiguous()
    out = torch.empty(batch, width, dtype=dense.dtype, device=dense.device)
    block_k = triton.next_power_of_2(width)
    block = max(16, min(BLOCK_D, 8192 // block_k))  # a [k, block] tile of rows per iteration
    _values_grad_kernel[(batch,)](
        indices.contiguous(), weight, dense, out, width, d, weight.stride(0), BLOCK_K=block_k, BLOCK=block
    )
    return out


def rows_by_latent_(
    out: Tensor, offsets: Tensor, rows: Tensor, coeffs_sorted: Tensor, dense: Tensor, accumulate: bool = False
) -> Tensor:
    """out[i] (+)= sum over entries e in [offsets[i], offsets[i + 1]) of coeffs_sorted[e] *
    dense[rows[e]]: the entries in latent order (`kernels.sparse.LatentOrder`: its offsets, its
    rows and the coefficients permuted by its `perm`). Overwrites every row (zeros where a latent
    has no entry) unless `accumulate`."""
    _require()
    _check_rows(out, "out")
    _check_rows(dense, "dense")
    n, d = out.shape
    if offsets.numel() != n + 1:
        raise ValueError(f"offsets has {offsets.numel()} entries for {n} latents (expected n + 1)")
    grid = (n, triton.cdiv(d, BLOCK_D))
    _rows_by_latent_kernel[grid](
        offsets,
        rows.contiguous(),
        coeffs_sorted.contiguous(),
        dense,
        out,
        d,
        dense.stride(0),
        out.stride(0),
        ACCUMULATE=accumulate,
        BLOCK=BLOCK_D,
    )
    return out


def rows_by_latent_order_(
    out: Tensor, order: LatentOrder, coeffs: Tensor, dense: Tensor, accumulate: bool = False, sync_free: bool = True
) -> Tensor:
    """`rows_by_latent_` with `kernels.sparse.rows_by_latent_`'s arguments (never reads the host)."""
    del sync_free  # always
    return rows_by_latent_(out, order.offsets, order.rows, coeffs.reshape(-1)[order.perm], dense, accumulate)
