"""Tensor parallelism over the latent dimension: the communication a latent-sharded step needs.

Each rank of a TP group holds a contiguous slice [offset, offset + n_local) of the latents
(W_enc / b_enc / W_dec rows, their Adam state and dead counters); b_pre is replicated. The step
needs only three collectives: an all-gather of each rank's local top-k candidates (values and
global indices) to pick the exact global top-k, and all-reduces of the partial reconstructions
and of the encoder's contribution to b_pre's gradient. The model code never imports Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class TensorParallel:
    rank: int  # rank inside the TP group
    size: int  # TP group size
    n_global: int  # latents of the whole autoencoder
    group: dist.ProcessGroup | None = None  # None: the default group

    def __post_init__(self) -> None:
        if self.n_global % self.size:
            raise ValueError(f"n_latents={self.n_global} is not divisible by tp={self.size}")

    @property
    def n_local(self) -> int:
        return self.n_global // self.size

    @property
    def offset(self) -> int:
        return self.rank * self.n_local

    def shard(self, t: Tensor) -> Tensor:
        """This rank's rows of a latent-indexed tensor."""
        return t[self.offset : self.offset + self.n_local]

    def all_gather_cat(self, t: Tensor) -> Tensor:
        """Concatenate every rank's [batch, w] tensor along dim 1 (rank order)."""
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)

    def all_reduce_(self, t: Tensor) -> Tensor:
        dist.all_reduce(t, group=self.group)
        return t

    def global_topk(self, values: Tensor, local_idx: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Exact global top-k from each rank's local candidates: one all-gather of values and
        global indices, then a top-k over the gathered [batch, size * w]. Returns the selected
        values and global indices (the same on every rank) and this rank's local indices (0
        where another rank owns the entry) with the ownership mask."""
        gidx = torch.where(local_idx >= 0, local_idx + self.offset, torch.full_like(local_idx, -1))
        all_vals = self.all_gather_cat(values)
        all_idx = self.all_gather_cat(gidx)
        vals, pos = all_vals.topk(k, dim=1, sorted=False)
        chosen = all_idx.gather(1, pos)
        owned = (chosen >= self.offset) & (chosen < self.offset + self.n_local)
        local = torch.where(owned, chosen - self.offset, torch.zeros_like(chosen))
        return vals, local, owned
