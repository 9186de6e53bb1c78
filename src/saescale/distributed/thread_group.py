"""Tensor parallelism between threads of one process: the TP ranks of a layout run side by side
when the cluster holds fewer workers than the layout has (`saescale.train.shard_threads`).

`ThreadGroup` gives a group of threads the collectives `TensorParallel` uses (all-gather and
all-reduce), with the same results as torch.distributed's: an all-gather is the parts in rank
order, and an all-reduce of two parts is their sum (IEEE addition commutes, so gloo's and NCCL's
two-rank ring give the same bits). Groups of more than two sum in rank order, which a ring does
not promise: those are the same maths, not the same bits.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from saescale.distributed.parallel import CommStats, TensorParallel

COLLECTIVE_TIMEOUT_S = 1800.0  # a rank that never arrives (a bug) fails the others, not hangs them

_REDUCE = {
    dist.ReduceOp.SUM: torch.add,
    dist.ReduceOp.MAX: torch.maximum,
    dist.ReduceOp.MIN: torch.minimum,
}


class ThreadGroup:
    """A rendezvous of `size` threads: each collective is one exchange of tensors."""

    def __init__(self, size: int, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> None:
        self.size = size
        self._barrier = threading.Barrier(size, timeout=timeout_s)
        self._slots: list[Tensor | None] = [None] * size

    def _exchange(self, rank: int, t: Tensor, combine):
        """Every rank's `t`, combined by `combine(parts)` on each rank while all are still
        unchanged (no rank writes its tensor before every rank has read it)."""
        self._slots[rank] = t
        self._barrier.wait()
        try:
            return combine(list(self._slots))
        finally:
            self._barrier.wait()

    def all_gather(self, rank: int, t: Tensor) -> list[Tensor]:
        return self._exchange(rank, t, lambda parts: [p.clone() for p in parts])

    def all_reduce_(self, rank: int, t: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
        if op not in _REDUCE:
            raise ValueError(f"ThreadGroup cannot reduce with {op}")
        fn = _REDUCE[op]

        def reduce(parts: list[Tensor]) -> Tensor:
            out = parts[0].clone()
            for part in parts[1:]:
                out = fn(out, part)
            return out

        t.copy_(self._exchange(rank, t, reduce))
        return t

    def abort(self) -> None:
        """Fail every rank waiting in (or arriving at) a collective: one rank raised."""
        self._barrier.abort()

    def reset(self) -> None:
        """Usable again after an abort (once every rank has left its collective)."""
        self._barrier.reset()


@dataclass
class ThreadTensorParallel(TensorParallel):
    """`TensorParallel` whose group is threads of this process (`ThreadGroup`)."""

    threads: ThreadGroup | None = None
    stats: CommStats = field(default_factory=CommStats)

    def _all_gather(self, t: Tensor) -> list[Tensor]:
        assert self.threads is not None
        return self.threads.all_gather(self.rank, t.contiguous())

    def all_reduce_(self, t: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
        assert self.threads is not None
        return self.threads.all_reduce_(self.rank, t, op)
