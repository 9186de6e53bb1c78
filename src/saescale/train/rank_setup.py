"""The per-rank set-up of a (dp x tp) run: this rank's slice of the SAE and its trainer, and
which rows of a global batch it loads. Independent of Ray: the Ray Train worker, the
benchmarks and the plain torch.distributed tests all start a rank this way."""

from __future__ import annotations

import dataclasses

from torch import Tensor

from saescale.core.config import SAEConfig, TrainConfig
from saescale.core.model import TopKSAE
from saescale.distributed.mesh import ParallelDims
from saescale.train.loggers import MetricsLogger, NullLogger
from saescale.train.trainer import Trainer


def build_rank_trainer(
    sae_cfg: SAEConfig,
    train_cfg: TrainConfig,
    dims: ParallelDims,
    rank: int,
    logger: MetricsLogger | None = None,
    device: str = "cpu",
    shard_threads: int = 1,
) -> Trainer:
    """This rank's trainer over its slice of the latents (the whole SAE when tp=1); its TP and
    DP handles are `trainer.tp` and `trainer.dp`. Every rank must call this together. A
    one-worker layout may run `shard_threads` TP ranks as threads (`saescale.train.shard_threads`)."""
    dims.validate(sae_cfg.n_latents)
    tp, dp = dims.build(rank, sae_cfg.n_latents, device_type="cuda" if str(device).startswith("cuda") else "cpu")
    n_local = sae_cfg.n_latents // dims.tp
    if (sae_cfg.k_aux or 1) > n_local:
        raise ValueError(f"sae.k_aux={sae_cfg.k_aux} exceeds the latents per TP rank ({n_local})")
    sae = TopKSAE(dataclasses.replace(sae_cfg, n_latents=n_local), device=device)
    return Trainer(
        sae,
        train_cfg,
        logger if rank == 0 else NullLogger(),
        tp=tp,
        dp=dp,
        global_sae_cfg=sae_cfg,
        shard_threads=shard_threads,
    )


def local_share(global_batch: Tensor, dims: ParallelDims, rank: int) -> Tensor:
    """The rows of a global batch that `rank` loads: DP replica a gets the a-th contiguous
    part, and TP rank t of that replica the t-th piece of it (so the TP all-gather rebuilds the
    replica's part in order)."""
    per_rank = global_batch.shape[0] // dims.world_size
    return global_batch[rank * per_rank : (rank + 1) * per_rank]
