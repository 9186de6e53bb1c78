"""The (data x tensor)-parallel layout of a run: sizes, validation, and the process groups.

Ranks form a 2-D mesh (dp, tp) with TP innermost, torchtitan-style: ranks r and r+1 share a TP
group (so a TP group sits on one node / NVLink island when Ray Train packs consecutive ranks),
and ranks tp_rank, tp_rank + tp, ... form a DP group. TP splits the latents; DP splits the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from saescale.distributed.parallel import DataParallel, TensorParallel


class MeshError(ValueError):
    """The parallel layout does not match the worker count, the latents or the batch."""


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    tp: int

    @classmethod
    def from_world(cls, world_size: int, tp: int) -> ParallelDims:
        if tp <= 0 or world_size <= 0 or world_size % tp:
            raise MeshError(f"the worker count ({world_size}) must be a positive multiple of parallel.tp={tp}")
        return cls(dp=world_size // tp, tp=tp)

    @property
    def world_size(self) -> int:
        return self.dp * self.tp

    def validate(self, n_latents: int, batch_size: int | None = None) -> None:
        if n_latents % self.tp:
            raise MeshError(f"sae.n_latents={n_latents} is not divisible by parallel.tp={self.tp}")
        if batch_size is not None and batch_size % self.world_size:
            raise MeshError(
                f"train.batch_size={batch_size} must be divisible by the worker count {self.world_size} "
                f"(each worker loads batch_size / workers rows per step)"
            )

    def coords(self, rank: int) -> tuple[int, int]:
        """(dp_rank, tp_rank) of a global rank."""
        return rank // self.tp, rank % self.tp

    def build(
        self, rank: int, n_latents: int, device_type: str = "cpu"
    ) -> tuple[TensorParallel | None, DataParallel | None]:
        """This rank's TP and DP handles (None for a dimension of size 1). Needs an initialised
        default process group of world_size ranks; every rank must call this together."""
        if self.world_size == 1:
            return None, None
        if not dist.is_initialized() or dist.get_world_size() != self.world_size:
            raise MeshError(f"parallel layout dp={self.dp} x tp={self.tp} needs {self.world_size} initialised ranks")
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, (self.dp, self.tp), mesh_dim_names=("dp", "tp"))
        dp_rank, tp_rank = self.coords(rank)
        tp = TensorParallel(tp_rank, self.tp, n_latents, mesh["tp"].get_group()) if self.tp > 1 else None
        dp = DataParallel(dp_rank, self.dp, mesh["dp"].get_group()) if self.dp > 1 else None
        return tp, dp
