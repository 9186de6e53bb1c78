"""The per-rank training loop of a (dp x tp) run, independent of Ray and of storage.

Each rank receives its own share of every global batch (batch_size / world rows: Ray Data's
`streaming_split(world, equal=True)`, or `local_share` for an in-memory source), the ranks of a TP
group all-gather their shares into the replica's batch, and `Trainer.train_step` does the rest
(TP collectives inside the step, DP gradient averaging after it). Before each step all ranks
agree, with one tiny all-reduce, that every rank has a batch: a rank whose stream ended stops the
whole run at the same step instead of leaving its peers blocked in a collective.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from saescale.core.config import SAEConfig, TrainConfig
from saescale.train.loggers import MetricsLogger, NullLogger
from saescale.distributed.mesh import ParallelDims
from saescale.core.model import TopKSAE
from saescale.distributed.parallel import DataParallel, TensorParallel
from saescale.train.trainer import Trainer


def print0(*args: object) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print("[saescale]", *args, flush=True)


def build_rank_trainer(
    sae_cfg: SAEConfig, train_cfg: TrainConfig, dims: ParallelDims, rank: int,
    logger: MetricsLogger | None = None, device: str = "cpu",
) -> tuple[Trainer, TensorParallel | None, DataParallel | None]:
    """This rank's trainer over its slice of the latents (the whole SAE when tp=1)."""
    dims.validate(sae_cfg.n_latents)
    tp, dp = dims.build(rank, sae_cfg.n_latents, device_type="cuda" if str(device).startswith("cuda") else "cpu")
    local_cfg = dataclasses.replace(sae_cfg, n_latents=sae_cfg.n_latents // dims.tp,
                                    k_aux=min(sae_cfg.k_aux or 1, sae_cfg.n_latents // dims.tp))
    if local_cfg.k_aux != sae_cfg.k_aux:
        raise ValueError(f"sae.k_aux={sae_cfg.k_aux} exceeds the latents per TP rank ({local_cfg.n_latents})")
    sae = TopKSAE(local_cfg, device=device)
    trainer = Trainer(sae, train_cfg, logger if rank == 0 else NullLogger(), tp=tp, dp=dp, keep_history=False)
    return trainer, tp, dp


def local_share(global_batch: Tensor, dims: ParallelDims, rank: int) -> Tensor:
    """The rows of a global batch that `rank` loads: DP replica a gets the a-th contiguous
    part, and TP rank t of that replica the t-th piece of it (so the TP all-gather rebuilds the
    replica's part in order)."""
    per_rank = global_batch.shape[0] // dims.world_size
    return global_batch[rank * per_rank : (rank + 1) * per_rank]


@dataclass
class StepTimes:
    """Where a window of steps spent its time, summed over the window (seconds)."""

    data_wait: float = 0.0  # waiting for the next batch, excluding the pipeline's start-up
    startup_wait: float = 0.0  # waiting for the first batch of this attempt (the pipeline starting)
    compute: float = 0.0
    comm: float = 0.0
    comm_bytes: int = 0
    steps: int = 0
    tokens: int = 0

    def add(self, other: "StepTimes") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_metrics(self, wall: float) -> dict[str, float]:
        steps = max(self.steps, 1)
        return {
            "tokens_per_s": self.tokens / max(wall, 1e-9),
            "time/data_wait_s": self.data_wait / steps,
            "time/startup_wait_s": self.startup_wait,
            "time/compute_s": self.compute / steps,
            "time/comm_s": self.comm / steps,
            "data_wait_frac": self.data_wait / max(wall - self.startup_wait, 1e-9),
            "comm_bytes_per_step": self.comm_bytes / steps,
        }


class RankLoop:
    """Runs steps on one rank; the caller provides the local batches and what to do at a
    checkpoint. Metrics (rank 0's logger) include the data-wait / compute / communication split."""

    def __init__(self, trainer: Trainer, tp: TensorParallel | None, dp: DataParallel | None,
                 checkpoint_every: int | None = None) -> None:
        self.trainer, self.tp, self.dp = trainer, tp, dp
        self.checkpoint_every = checkpoint_every
        self.history: list[dict[str, float]] = []
        self.totals = StepTimes()  # the whole run on this rank, for the final report

    def _comm(self) -> tuple[float, int]:
        seconds = sum(h.stats.seconds for h in (self.tp, self.dp) if h is not None)
        sent = sum(h.stats.bytes_sent for h in (self.tp, self.dp) if h is not None)
        return seconds, sent

    def _everyone_has_data(self, has_batch: bool) -> bool:
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return has_batch
        # on the trainer's device: under NCCL (GPUs) the default group rejects CPU tensors
        flag = torch.tensor([1 if has_batch else 0], dtype=torch.int32, device=self.trainer.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def run(self, local_batches: Iterable[Tensor], max_steps: int,
            on_checkpoint: Callable[[int], None] | None = None,
            on_step: Callable[[int], None] | None = None) -> int:
        """Train until `max_steps` (total, counting restored steps) or the data ends on any rank."""
        trainer = self.trainer
        it = iter(local_batches)
        times, window_start = StepTimes(), time.perf_counter()
        while trainer.step < max_steps:
            t0 = time.perf_counter()
            batch = next(it, None)
            t1 = time.perf_counter()
            if not self._everyone_has_data(batch is not None):
                print0(f"data ended at step {trainer.step} (of {max_steps}); stopping every rank there")
                break
            comm0, bytes0 = self._comm()
            x = self.tp.all_gather_rows(batch) if self.tp is not None else batch
            metrics = trainer.train_step(x)
            t2 = time.perf_counter()
            comm1, bytes1 = self._comm()
            first = self.totals.steps == 0
            one = StepTimes(data_wait=0.0 if first else t1 - t0, startup_wait=t1 - t0 if first else 0.0, compute=(t2 - t1) - (comm1 - comm0), comm=comm1 - comm0,
                            comm_bytes=bytes1 - bytes0, steps=1,
                            tokens=x.shape[0] * (self.dp.size if self.dp is not None else 1))
            times.add(one)
            self.totals.add(one)
            if metrics is not None:
                metrics.update(times.as_metrics(time.perf_counter() - window_start))
                trainer.logger.log(metrics, trainer.step)
                self.history.append({"step": float(trainer.step), **metrics})
                times, window_start = StepTimes(), time.perf_counter()
            if trainer.step % trainer.cfg.histogram_every == 0:
                trainer._log_density_histogram()
            if on_step is not None:
                on_step(trainer.step)
            if on_checkpoint is not None and self.checkpoint_every and trainer.step % self.checkpoint_every == 0:
                on_checkpoint(trainer.step)
        return trainer.step
