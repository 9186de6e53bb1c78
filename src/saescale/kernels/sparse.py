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
_CHUNK_BYTES = 8 * 2**20  # ~4k rows at d=576: stays in cache, recycled by malloc
# Entries x d of one embedding_bag call stay under this: CUDA's per-sample-weight kernels index
# entries * d in 32 bits (measured: an illegal memory access at 134M entries x 576 on an H200, a
# ReLU code at init). A dense-ish ragged code (ReLU early in training) is split into calls this big.
_MAX_BAG_ELEMENTS = 2**30


def _entry_spans(offsets: Tensor, total: int, d: int) -> list[tuple[int, int, int, int]]:
    """(first group, end group, first entry, end entry) spans of a CSR layout (`offsets`: each
    row's or latent's first entry, `total`: the end of the last group's entries) whose entries x d
    stay under _MAX_BAG_ELEMENTS; one span when small."""
    groups = offsets.numel()
    limit = max(1, _MAX_BAG_ELEMENTS // max(1, d))
    first_entry = int(offsets[0]) if groups else 0  # offsets may be a slice of a larger layout
    if total - first_entry <= limit:
        return [(0, groups, first_entry, total)]
    starts = offsets.tolist() + [total]
    ends = torch.tensor(starts[1:], dtype=torch.long)  # each group's end entry
    spans, first = [], 0
    while first < groups:
        # the most groups from `first` whose entries fit (at least one: a group is never split)
        fits = int(torch.searchsorted(ends, starts[first] + limit, right=True))
        end = min(max(first + 1, fits), groups)
        spans.append((first, end, starts[first], starts[end]))
        first = end
    return spans


class LatentOrder:
    """The entries of a [batch, K] index matrix regrouped by latent (the CSR form of its transpose).

    Built once per step (one stable sort of batch*K integers) and shared by every product that
    scatters into weight rows.
    """

    def __init__(self, indices: Tensor, n_latents: int, rows: Tensor | None = None) -> None:
        """indices: a [batch, K] code, or (with `rows`, the batch row of each entry) a flat
        ragged code whose rows may hold different numbers of entries."""
        if rows is None and indices.dim() != 2:
            raise ValueError(f"indices must be [batch, K], got shape {tuple(indices.shape)}")
        self.n_latents = n_latents
        flat = indices.reshape(-1)
        self.latent_sorted, self.perm = flat.sort(stable=True)
        # batch row of each entry, in latent order
        if rows is None:
            self.rows = torch.div(self.perm, indices.shape[1], rounding_mode="floor")
        else:
            self.rows = rows[self.perm]
        # (an index_add_ of ones, not bincount: CUDA's bincount reads the largest index on the host)
        counts = torch.zeros(n_latents, dtype=torch.long, device=indices.device)
        counts.index_add_(0, flat, torch.ones_like(flat))
        self.offsets = torch.zeros(n_latents + 1, dtype=torch.long, device=indices.device)
        torch.cumsum(counts, 0, out=self.offsets[1:])
        self._offsets_cpu: list[int] | None = None

    def offset(self, i: int) -> int:
        if self._offsets_cpu is None:
            self._offsets_cpu = self.offsets.tolist()
        return self._offsets_cpu[i]


def _needs_autograd(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def sparse_decode(indices: Tensor, values: Tensor, weight: Tensor) -> Tensor:
    """x_hat[b] = sum_j values[b, j] * weight[indices[b, j]] without any dense [batch, n] tensor.

    Differentiable through autograd (embedding_bag's own backward) when inputs require grad;
    the training step uses the explicit backward products below instead.
    """
    values = values.to(weight.dtype)
    if _needs_autograd(values, weight):
        return F.embedding_bag(indices, weight, per_sample_weights=values, mode="sum")
    batch, width = indices.shape
    step = max(1, _MAX_BAG_ELEMENTS // max(1, width * weight.shape[1]))  # rows per call (a wide ReLU code)
    parts = []
    for lo in range(0, batch, step):
        idx, val = indices[lo : lo + step], values[lo : lo + step]
        offsets = torch.arange(0, idx.shape[0] * width, width, device=indices.device)
        parts.append(
            torch.ops.aten._embedding_bag_forward_only(
                weight, idx.reshape(-1), offsets, False, 0, False, val.reshape(-1), False, -1
            )[0]
        )
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _bag_into(out: Tensor, rows: Tensor, dense: Tensor, offsets: Tensor, weights: Tensor) -> None:
    """out = embedding_bag(rows, dense, offsets, weights), written in place when the backend can."""
    try:
        empty = torch.empty(0, dtype=torch.long, device=out.device)
        torch.ops.aten._embedding_bag_forward_only.out(
            dense,
            rows,
            offsets,
            False,
            0,
            False,
            weights,
            False,
            -1,
            out0=out,
            out1=empty,
            out2=empty.clone(),
            out3=empty.clone(),
        )
    except (RuntimeError, AttributeError):  # pragma: no cover - backend without the out= variant
        out.copy_(F.embedding_bag(rows, dense, offsets, per_sample_weights=weights, mode="sum"))


def whole_bag_fits(entries: int, d: int) -> bool:
    """Whether one embedding_bag call may take `entries` entries of width d (see _MAX_BAG_ELEMENTS)."""
    return entries * d <= _MAX_BAG_ELEMENTS


def rows_by_latent_(
    out: Tensor, order: LatentOrder, coeffs: Tensor, dense: Tensor, accumulate: bool = False, sync_free: bool = False
) -> Tensor:
    """out[i] (+)= sum over entries (b, j) with latent i of coeffs[b, j] * dense[b].

    This is the gradient of a weight matrix [n, d] from sparse coefficients [batch, K] and a
    dense [batch, d] factor (the decoder's output gradient, or the encoder's centred input).
    Rows with no entries are written as zeros (or left unchanged when accumulating).

    `sync_free` (overwrite only): one call over every latent, with no host read of the offsets
    (the chunked loop reads them to slice each chunk's entries); needs `whole_bag_fits`.
    """
    n, d = out.shape
    if n != order.n_latents:
        raise ValueError(f"out has {n} rows but the order covers {order.n_latents} latents")
    weights_sorted = coeffs.reshape(-1).to(dense.dtype)[order.perm]
    if sync_free:
        if accumulate or not whole_bag_fits(order.rows.numel(), d):
            raise ValueError("rows_by_latent_(sync_free=True) overwrites, with entries x d under 2^30")
        _bag_into(out, order.rows, dense, order.offsets[:-1], weights_sorted)
        return out
    chunk = max(1, _CHUNK_BYTES // max(1, d * out.element_size()))
    if accumulate:
        # only the latents that have entries: bag them, then add into their rows
        latents, counts = torch.unique_consecutive(order.latent_sorted, return_counts=True)
        starts = torch.zeros_like(counts)
        torch.cumsum(counts[:-1], 0, out=starts[1:])
        bounds = starts.tolist() + [order.latent_sorted.numel()]
        for first in range(0, latents.numel(), chunk):
            last = min(latents.numel(), first + chunk)
            lo, hi = bounds[first], bounds[last]
            part = F.embedding_bag(
                order.rows[lo:hi], dense, starts[first:last] - lo, per_sample_weights=weights_sorted[lo:hi], mode="sum"
            )
            out.index_add_(0, latents[first:last], part)
        return out
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        lo, hi = order.offset(start), order.offset(stop)
        if hi == lo:
            out[start:stop].zero_()
            continue
        for first, end, e_lo, e_hi in _entry_spans(order.offsets[start:stop], hi, d):  # one span unless huge
            rows, offsets = order.rows[e_lo:e_hi], order.offsets[start + first : start + end] - e_lo
            _bag_into(out[start + first : start + end], rows, dense, offsets, weights_sorted[e_lo:e_hi])
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


class RaggedCode:
    """A sparse code whose tokens hold different numbers of entries (e.g. all positive AuxK
    pre-activations): flat latent indices and values, the batch row of each entry, and each
    row's first entry (`offsets`, as embedding_bag takes them). Entries are grouped by row."""

    def __init__(self, rows: Tensor, latents: Tensor, values: Tensor, batch: int) -> None:
        self.rows, self.latents, self.values, self.batch = rows, latents, values, batch
        counts = torch.bincount(rows, minlength=batch)
        self.offsets = torch.zeros(batch, dtype=torch.long, device=rows.device)
        torch.cumsum(counts[:-1], 0, out=self.offsets[1:])

    def spans(self, d: int) -> list[tuple[int, int, int, int]]:
        """Row spans small enough for one embedding_bag call each (see _MAX_BAG_ELEMENTS)."""
        return _entry_spans(self.offsets, self.latents.numel(), d)

    def decode(self, weight: Tensor) -> Tensor:
        values = self.values.to(weight.dtype)
        spans = self.spans(weight.shape[1])
        if len(spans) == 1:
            return torch.ops.aten._embedding_bag_forward_only(
                weight, self.latents, self.offsets, False, 0, False, values, False, -1
            )[0]
        out = torch.empty(self.batch, weight.shape[1], dtype=weight.dtype, device=weight.device)
        for r_lo, r_hi, e_lo, e_hi in spans:
            out[r_lo:r_hi] = torch.ops.aten._embedding_bag_forward_only(
                weight,
                self.latents[e_lo:e_hi],
                self.offsets[r_lo:r_hi] - e_lo,
                False,
                0,
                False,
                values[e_lo:e_hi],
                False,
                -1,
            )[0]
        return out

    def values_grad(self, weight: Tensor, dense: Tensor) -> Tensor:
        """d(decode)/d(values) contracted with `dense` [batch, d]: dense[row] . weight[latent]."""
        dense = dense.contiguous()
        parts = [
            torch.ops.aten._embedding_bag_per_sample_weights_backward(
                dense[r_lo:r_hi],
                weight,
                self.latents[e_lo:e_hi],
                self.offsets[r_lo:r_hi] - e_lo,
                self.rows[e_lo:e_hi] - r_lo,
                0,
                -1,
            )
            for r_lo, r_hi, e_lo, e_hi in self.spans(weight.shape[1])
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def latent_sums(indices: Tensor, coeffs: Tensor, n_latents: int) -> Tensor:
    """s[i] = sum of coeffs over the entries of latent i (the gradient of a latent bias)."""
    out = torch.zeros(n_latents, dtype=coeffs.dtype, device=coeffs.device)
    return out.index_add_(0, indices.reshape(-1), coeffs.reshape(-1))
