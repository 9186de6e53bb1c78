"""Sparse products for a TopK autoencoder: every op here costs O(batch * k * d), never O(batch * n * d).

A TopK code is a [batch, K] matrix of latent indices with values. Three products appear in a
training step, all expressed with `embedding_bag` (a fused gather-multiply-sum that exists on
CPU and CUDA and never materialises the [batch, K, d] gathered rows):

* decode:            x_hat[b]   = sum_j  v[b, j] * W[idx[b, j]]
* row gradient:      dW[i]      = sum_{(b, j): idx[b, j] = i}  c[b, j] * dense[b]
  (the same bag, transposed: entries regrouped by latent, `LatentOrder`)
* value gradient:    dv[b, j]   = dense[b] . W[idx[b, j]]

Outputs that are as large as a weight matrix are written in row chunks straight into a
caller-owned buffer: fresh multi-hundred-MB allocations fault in slowly, and a chunk of a few MB
is recycled by the allocator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Rows per chunk of a [n, d] output are chosen so that one chunk is about this many bytes.
_CHUNK_BYTES = 8 * 2**20


class LatentOrder:
    """The entries of a [batch, K] index matrix regrouped by latent (the CSR form of its transpose).

    Built once per step (one stable sort of batch*K integers) and shared by every product that
    scatters into weight rows.
    """

    def __init__(self, indices: Tensor, n_latents: int) -> None:
        if indices.dim() != 2:
            raise ValueError(f"indices must be [batch, K], got shape {tuple(indices.shape)}")
        self.batch, self.width = indices.shape
        self.n_latents = n_latents
        flat = indices.reshape(-1)
        self.latent_sorted, self.perm = flat.sort(stable=True)
        # batch row of each entry, in latent order
        self.rows = torch.div(self.perm, self.width, rounding_mode="floor")
        counts = torch.bincount(flat, minlength=n_latents)
        self.offsets = torch.zeros(n_latents + 1, dtype=torch.long, device=indices.device)
        torch.cumsum(counts, 0, out=self.offsets[1:])
        self._offsets_cpu: list[int] | None = None

    def offset(self, i: int) -> int:
        if self._offsets_cpu is None:
            self._offsets_cpu = self.offsets.tolist()
        return self._offsets_cpu[i]


def sparse_decode(indices: Tensor, values: Tensor, weight: Tensor) -> Tensor:
    """x_hat[b] = sum_j values[b, j] * weight[indices[b, j]] without any dense [batch, n] tensor."""
    return F.embedding_bag(indices, weight, per_sample_weights=values.to(weight.dtype), mode="sum")


def rows_by_latent_(
    out: Tensor, order: LatentOrder, coeffs: Tensor, dense: Tensor, accumulate: bool = False
) -> Tensor:
    """out[i] (+)= sum over entries (b, j) with latent i of coeffs[b, j] * dense[b].

    This is the gradient of a weight matrix [n, d] from sparse coefficients [batch, K] and a
    dense [batch, d] factor (the decoder's output gradient, or the encoder's centred input).
    Rows with no entries are written as zeros (or left unchanged when accumulating).
    """
    n, d = out.shape
    if n != order.n_latents:
        raise ValueError(f"out has {n} rows but the order covers {order.n_latents} latents")
    weights_sorted = coeffs.reshape(-1).to(dense.dtype)[order.perm]
    chunk = max(1, _CHUNK_BYTES // max(1, d * out.element_size()))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        lo, hi = order.offset(start), order.offset(stop)
        if hi == lo:
            if not accumulate:
                out[start:stop].zero_()
            continue
        part = F.embedding_bag(
            order.rows[lo:hi],
            dense,
            order.offsets[start:stop] - lo,
            per_sample_weights=weights_sorted[lo:hi],
            mode="sum",
        )
        if accumulate:
            out[start:stop].add_(part)
        else:
            out[start:stop].copy_(part)
    return out


def values_grad(indices: Tensor, weight: Tensor, dense: Tensor) -> Tensor:
    """dv[b, j] = dense[b] . weight[indices[b, j]]: the gradient of `sparse_decode` w.r.t. values."""
    batch, width = indices.shape
    flat = indices.reshape(-1)
    offsets = torch.arange(0, batch * width, width, device=indices.device)
    offset2bag = torch.arange(batch, device=indices.device).repeat_interleave(width)
    try:
        grad = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            dense.contiguous(), weight, flat, offsets, offset2bag, 0, -1
        )
        return grad.view(batch, width)
    except (RuntimeError, AttributeError):  # pragma: no cover - op missing on some backends
        out = torch.empty(batch, width, dtype=dense.dtype, device=dense.device)
        step = max(1, _CHUNK_BYTES // max(1, width * weight.shape[1] * weight.element_size()))
        for s in range(0, batch, step):
            rows = weight[indices[s : s + step]]
            out[s : s + step] = torch.bmm(rows, dense[s : s + step, :, None]).squeeze(-1)
        return out


def latent_sums(indices: Tensor, coeffs: Tensor, n_latents: int) -> Tensor:
    """s[i] = sum of coeffs over the entries of latent i (the gradient of a latent bias)."""
    out = torch.zeros(n_latents, dtype=coeffs.dtype, device=coeffs.device)
    return out.index_add_(0, indices.reshape(-1), coeffs.reshape(-1))
