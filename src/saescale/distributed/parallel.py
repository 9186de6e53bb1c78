"""Data and tensor parallelism: the communication a latent-sharded, data-parallel step needs.

Each rank of a TP group holds a contiguous slice [offset, offset + n_local) of the latents
(W_enc / b_enc / W_dec rows, their Adam state and dead counters); b_pre is replicated. The step
needs only three collectives: an all-gather of each rank's local top-k candidates (values and
global indices) to pick the exact global top-k, and all-reduces of the partial reconstructions
and of the encoder's contribution to b_pre's gradient. Data parallelism averages gradients over
replicas and makes the per-batch statistics (dead latents, the AuxK normaliser) global, so a
dp x tp run takes the same steps as one process on the whole batch. The model code never
imports Ray.

Every collective goes through `CommStats`, which counts seconds and bytes (ring-algorithm bytes
sent per rank: (p-1)/p of the result for an all-gather, 2(p-1)/p of the tensor for an
all-reduce), so benchmarks and the trainer can report communication separately from compute.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class CommStats:
    """Seconds spent in collectives and bytes sent by this rank (ring model), since reset()."""

    seconds: float = 0.0
    bytes_sent: int = 0

    def reset(self) -> None:
        self.seconds, self.bytes_sent = 0.0, 0


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU, where ops run synchronously): CUDA
    kernels are asynchronous, so a timer read without it charges compute to whatever waits next."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _all_reduce(t: Tensor, size: int, group, stats: CommStats, op=dist.ReduceOp.SUM) -> Tensor:
    synchronize(t.device)  # pending compute is not communication
    t0 = time.perf_counter()
    dist.all_reduce(t, op=op, group=group)
    synchronize(t.device)
    stats.seconds += time.perf_counter() - t0
    stats.bytes_sent += 2 * (size - 1) * t.numel() * t.element_size() // size
    return t


def _all_gather(t: Tensor, size: int, group, stats: CommStats) -> list[Tensor]:
    synchronize(t.device)
    t0 = time.perf_counter()
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    synchronize(t.device)
    stats.seconds += time.perf_counter() - t0
    stats.bytes_sent += (size - 1) * t.numel() * t.element_size()
    return parts


@dataclass
class TensorParallel:
    rank: int  # rank inside the TP group
    size: int  # TP group size
    n_global: int  # latents of the whole autoencoder
    group: dist.ProcessGroup | None = None  # None: the default group
    stats: CommStats = field(default_factory=CommStats)

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
        return torch.cat(self._all_gather(t), dim=1)

    def all_gather_rows(self, t: Tensor) -> Tensor:
        """Concatenate every rank's [rows, ...] tensor along dim 0 (rank order): how the ranks
        of a TP group, each holding a share of the batch, assemble the batch they all train on."""
        return torch.cat(self._all_gather(t), dim=0)

    def _all_gather(self, t: Tensor) -> list[Tensor]:
        return _all_gather(t, self.size, self.group, self.stats)

    def all_reduce_(self, t: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
        return _all_reduce(t, self.size, self.group, self.stats, op)

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


@dataclass
class DataParallel:
    """Replicas of the same (shard of the) autoencoder, each on its own part of the batch."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None
    stats: CommStats = field(default_factory=CommStats)

    def all_reduce_(self, t: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
        return _all_reduce(t, self.size, self.group, self.stats, op)

    def all_gather_cat(self, t: Tensor) -> Tensor:
        """Concatenate every replica's [rows, w] tensor along dim 1 (rank order): BatchTopK's
        candidates, whose batch-global cut spans the replicas' shares of the batch."""
        return torch.cat(_all_gather(t, self.size, self.group, self.stats), dim=1)

    def average_grads_(self, params: list[Tensor]) -> None:
        """Average gradients over replicas, in place (no copy the size of a weight matrix)."""
        for p in params:
            self.all_reduce_(p.grad).div_(self.size)
