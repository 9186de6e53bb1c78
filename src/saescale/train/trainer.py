"""The one training loop, for a single process and for every rank of a (dp x tp) run.

It consumes any iterable of [batch, d_in] activation tensors (this rank's share of each global
batch) and knows nothing of language models, Ray or storage formats. What differs between a
local run and a Ray Train worker is passed in as small objects: where checkpoints go (a
`Checkpointer`: `train.checkpoint.StorageCheckpointer` on any URL, or the service's
`ray.train.report` one), where metrics go (a `MetricsLogger`), and how batches arrive (the
iterable). Interval logic (log, histogram, checkpoint) lives only in `Trainer.fit`.

Per step: all ranks agree that each has a good batch (one tiny all-reduce: a rank whose stream
ended, or whose batch is malformed, stops every rank at the same step with its own error instead
of leaving peers blocked in a collective); the TP group all-gathers its shares; then normalise,
sparse forward/backward (`train.step`), agree that every replica's loss is finite, average
gradients over replicas, remove the decoder-parallel gradient, optional clipping, Adam,
renormalise decoder rows, optional EMA.

Resuming: `restore()` loads the latest checkpoint; the caller then feeds the batches that follow
the `step` it returns (e.g. `itertools.islice(batches, trainer.step, None)` for a replayable
source): a resumed run then reproduces the uninterrupted one to float tolerance.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import psutil
import torch
import torch.distributed as dist
from torch import Tensor

from saescale.console import first_line, print0
from saescale.core.arch.batchtopk import threshold_weight
from saescale.core.config import SAEConfig, TrainConfig
from saescale.core.model import TopKSAE, check_activations
from saescale.distributed.parallel import DataParallel, TensorParallel, synchronize
from saescale.distributed.plan import auto_micro_batches
from saescale.train.cadence import CheckpointCadence
from saescale.train.checkpoint import StorageCheckpointer, TrainerSnapshot
from saescale.train.dead_latents import DeadLatentTracker
from saescale.train.graphs import CompiledStep, resolve_cuda_graphs
from saescale.train.loggers import MetricsLogger, NullLogger
from saescale.train.optim import WeightEMA, lr_at, make_adam, remove_parallel_grad_
from saescale.train.precision import Precision
from saescale.train.shard_threads import ShardThreads
from saescale.train.step import SparseTopKStep, StepStats, sync_free_setting

EPS = 1e-9  # guards divisions by elapsed times and counts


class Checkpointer(Protocol):
    """Where a run's checkpoints go; `final` marks the save at the end of `fit`. One that writes
    in the background may also say when a write is in flight (`writing() -> bool`), so that
    `checkpoint_every=auto` counts the steps the write slows (`train.cadence`)."""

    def save(self, trainer: Trainer, final: bool = False) -> Any: ...


class RankError(ValueError):
    """A rank of a distributed run saw a bad batch or a non-finite loss; every rank raises this
    with that rank's message, so the run stops together instead of hanging in a collective."""


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

    def add(self, other: StepTimes) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def seconds(self) -> float:
        """The steps' own time: waiting for batches, compute and communication."""
        return self.data_wait + self.compute + self.comm

    def as_metrics(self, wall: float) -> dict[str, float]:
        steps = max(self.steps, 1)
        return {
            "tokens_per_s": self.tokens / max(wall, EPS),
            "time/data_wait_s": self.data_wait / steps,
            "time/startup_wait_s": self.startup_wait,
            "time/compute_s": self.compute / steps,
            "time/comm_s": self.comm / steps,
            "data_wait_frac": self.data_wait / max(wall - self.startup_wait, EPS),
            "comm_bytes_per_step": self.comm_bytes / steps,
        }


@dataclass
class TrainSummary:
    steps: int
    tokens: int
    final: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    totals: StepTimes = field(default_factory=StepTimes)  # this attempt's whole time split
    checkpoints: int = 0  # saved in this attempt (the final one included)
    checkpoint_stall_s: float = 0.0  # seconds training waited on them
    checkpoint_every: int | None = None  # checkpoint_every=auto: the last interval chosen (steps)
    preempted: bool = False  # stopped early on a preemption notice (after the final checkpoint)


class Trainer:
    def __init__(
        self,
        sae: TopKSAE,
        cfg: TrainConfig,
        logger: MetricsLogger | None = None,
        checkpoint_url: str | None = None,
        storage_options: dict[str, Any] | None = None,
        tp: TensorParallel | None = None,
        dp: DataParallel | None = None,
        global_sae_cfg: SAEConfig | None = None,
        shard_threads: int = 1,
    ) -> None:
        """With `tp`, `sae` is this rank's slice of the latents (`global_sae_cfg` describes the
        whole SAE); with `dp`, each batch is this replica's part of the global batch (see
        `distributed.parallel`). `checkpoint_url` gives `fit` and `restore` a default
        `StorageCheckpointer` there. `shard_threads` > 1 (one process, no tp or dp): each step
        is that many TP ranks' steps, one thread each (`saescale.train.shard_threads`): the steps of a
        tp=`shard_threads` layout, on one worker."""
        sae.activation.check(sae.cfg)  # e.g. a ReLU SAE needs an L1 penalty to be trained
        self.sae = sae
        self.tp = tp
        self.dp = dp if dp is not None and dp.size > 1 else None
        if shard_threads > 1 and (tp is not None or self.dp is not None):
            raise ValueError("shard_threads runs a layout's TP ranks in one process: not with tp or dp handles")
        self.shard_threads = shard_threads
        self.global_sae_cfg = global_sae_cfg or sae.cfg
        self.n_global = self.global_sae_cfg.n_latents
        self.cfg = cfg
        self.logger = logger or NullLogger()
        self.checkpointer = StorageCheckpointer(checkpoint_url, storage_options) if checkpoint_url else None
        self.device = sae.W_enc.device
        self.params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_pre]
        self.base_lr = cfg.resolved_lr(self.n_global)
        self.optimizer = make_adam(self.params, cfg, self.base_lr)
        self.tracker = DeadLatentTracker(sae.cfg.n_latents, sae.cfg.dead_tokens_threshold, self.device)
        self.ema = WeightEMA(self.params, cfg.ema_decay) if cfg.ema_decay else None
        self.precision = Precision.make(cfg.precision, self.device)
        if self.precision.low and not sae.activation.low_precision_selection:
            print0(
                f"sae.architecture={sae.cfg.architecture} trains its encoder in fp32 (train.precision={cfg.precision} ignored)"
            )
            self.precision = Precision("fp32")
        self.micro_batches = cfg.micro_batches
        self.step = 0
        self.tokens_seen = 0
        self.mse_scale: float | None = None
        self.summary = TrainSummary(steps=0, tokens=0)
        self._step_fn: SparseTopKStep | ShardThreads | None = None
        self._compiled: CompiledStep | None = None  # train.cuda_graphs
        self._fire_counts = torch.zeros(sae.cfg.n_latents, dtype=torch.long, device=self.device)
        self._bad_loss: Tensor | None = None  # sync-free steps: any loss not finite since the last check
        self._loss_checked_at = 0
        self._window_tokens = 0
        torch.manual_seed(cfg.seed)

    # -------------------------------------------------------------- set-up
    @torch.no_grad()
    def initialize(self, sample: Tensor) -> None:
        """Data-dependent init: input normalisation, b_pre = geometric median, MSE constant."""
        offset = self.tp.offset if self.tp is not None else 0
        self.sae.reset_parameters_seeded(self.cfg.seed, offset, transpose_init=self.cfg.init_transpose)
        sample = sample.to(self.device, torch.float32)
        self.sae.init_from_data_(sample, self.cfg.geometric_median_samples)
        normed, _ = self.sae.normalize(sample)
        variance = (normed - normed.mean(0)).pow(2).mean().item()
        if not variance > 0:
            raise ValueError("initialisation sample has zero variance; cannot normalise the loss")
        self.mse_scale = 1.0 / variance
        self._make_step_fn()

    def _make_step_fn(self) -> None:
        assert self.mse_scale is not None
        self._compiled = None
        micro_batches = self.micro_batches if self.micro_batches != "auto" else 1
        if self.shard_threads > 1:
            self._step_fn = ShardThreads(
                self.sae,
                self.mse_scale,
                self.tracker,
                self.shard_threads,
                self.precision,
                micro_batches,
                self.cfg.sparse_kernels,
            )
            return
        self._step_fn = SparseTopKStep(
            self.sae,
            self.mse_scale,
            self.tracker,
            tp=self.tp,
            dp=self.dp,
            precision=self.precision,
            micro_batches=micro_batches,
            sync_free=sync_free_setting(self.cfg.sync_free),
            kernels=self.cfg.sparse_kernels,
        )
        if resolve_cuda_graphs(self.cfg.cuda_graphs, self._step_fn):
            self._compiled = CompiledStep(self._step_fn)

    # ---------------------------------------------------------- agreement
    def _distributed(self) -> bool:
        return dist.is_initialized() and dist.get_world_size() > 1

    def agree(self, has_batch: bool, error: Exception | None) -> bool:
        """Whether every rank has a batch. When any rank reports an error, every rank raises:
        that rank its own error, the others `RankError` with its message (one all-reduce of
        three ints per call; the message is broadcast only then). In a single process the error
        itself is raised."""
        return self.agree_step(has_batch, error)[0]

    def agree_step(self, has_batch: bool, error: Exception | None, stop: bool = False) -> tuple[bool, bool]:
        """`agree`, and whether any rank was asked to stop (a preemption notice): every rank
        learns both at the same step."""
        if not self._distributed():
            if error is not None:
                raise error
            return has_batch, stop
        rank = dist.get_rank()
        # on the trainer's device: under NCCL (GPUs) the default group rejects CPU tensors
        flags = torch.tensor(
            [0 if has_batch else 1, rank + 1 if error is not None else 0, int(stop)],
            dtype=torch.int64,
            device=self.device,
        )
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        missing, bad, stopping = (int(v) for v in flags.tolist())
        if bad:
            message = [first_line(error)]
            dist.broadcast_object_list(message, src=bad - 1, device=self.device)
            if error is not None and bad - 1 == rank:
                raise error
            raise RankError(f"rank {bad - 1}: {message[0]}")
        return missing == 0, bool(stopping)

    def _batch_error(self, batch: Tensor | None) -> Exception | None:
        if batch is None:
            return None
        try:
            check_activations(batch, self.sae.cfg.d_in, name=f"batch at step {self.step}")
        except ValueError as exc:
            return exc
        return None

    # ------------------------------------------------------------- training
    def train_step(self, batch: Tensor) -> dict[str, float] | None:
        """One optimiser step on this replica's (TP-gathered) batch; returns logged metrics on
        logging steps, else None. Raises on every rank if any replica's loss is not finite."""
        check_activations(batch, self.sae.cfg.d_in, name=f"batch at step {self.step}")
        return self._checked_step(batch)

    def _checked_step(self, batch: Tensor) -> dict[str, float] | None:
        """`train_step` on a batch already checked (`fit` checks each rank's share before the
        TP all-gather, inside the agreement, so the gathered batch is not checked twice)."""
        if self._step_fn is None:
            self.initialize(batch)
        assert self._step_fn is not None
        x = batch.to(self.device, torch.float32, non_blocking=True)
        x_normed, _ = self.sae.normalize(x)
        if self._step_fn.micro_batches != self.micro_batches:  # "auto": planned on the first batch
            self._step_fn.micro_batches = self._planned_micro_batches(x.shape[0])
        logging_now = (self.step + 1) % self.cfg.log_every == 0
        width = self._step_fn.aux_width()  # the host's one decision (sync-free steps)
        if self._compiled is not None and width is not None and not logging_now:
            stats = self._compiled(x_normed, width)  # one compiled graph (train.cuda_graphs)
        else:
            stats = self._step_fn.run(x_normed, logging_now, width)
            self._step_fn.finish(stats)
        if self._agreed_overflow(stats.overflow):
            return self._skip_step(x.shape[0], stats)
        error = self._loss_error(stats.loss, logging_now)
        if self.dp is not None:  # TP ranks share one loss; replicas must agree before averaging
            self.agree(True, error)
        elif error is not None:
            raise error
        if self.dp is not None:
            self.dp.average_grads_(self.params)
        remove_parallel_grad_(self.sae.W_dec, self.sae.W_dec.grad)
        gnorm = None
        if self.cfg.clip_grad_norm is not None or logging_now:
            gnorm = self._grad_norm()
        if self.cfg.clip_grad_norm is not None:
            coef = torch.clamp(self.cfg.clip_grad_norm / (gnorm + 1e-6), max=1.0)
            torch._foreach_mul_([p.grad for p in self.params], coef)
        lr = lr_at(self.step, self.base_lr, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.sae.normalize_decoder_()
        if self.ema is not None:
            self.ema.update(self.params)
        if stats.batch_threshold is not None:  # BatchTopK's inference threshold: a running mean
            self.sae.threshold.lerp_(stats.batch_threshold, threshold_weight(self.step))
        batch_tokens = x.shape[0]
        self.step += 1
        self.tokens_seen += batch_tokens * (self.dp.size if self.dp is not None else 1)
        self._fire_counts += stats.fire_counts
        self._window_tokens += batch_tokens
        if not logging_now:
            return None
        penalty = stats.penalty_loss if stats.penalty_loss is not None else torch.zeros_like(stats.loss)
        replica = torch.stack(
            [stats.loss, stats.mse_loss, stats.fvu, stats.auxk_loss, stats.l0, stats.multi_topk_loss, penalty]
        ).float()
        if self.dp is not None:  # means over the replicas' equal parts = means over the batch
            self.dp.all_reduce_(replica).div_(self.dp.size)
        loss, mse_loss, fvu, auxk_loss, l0, multi_loss, penalty_loss = replica.tolist()
        metrics = {
            "loss": loss,
            "mse_loss": mse_loss,
            "fvu": fvu,
            "auxk_loss": auxk_loss,
            "l0": l0,
            "dead_fraction": float(stats.n_dead) / self.n_global,
            "lr": lr,
            "grad_norm": float(gnorm) if gnorm is not None else float("nan"),
            "tokens": float(self.tokens_seen),
        }
        if self.sae.cfg.multi_topk:
            metrics["multi_topk_loss"] = multi_loss
        if stats.penalty_loss is not None:
            metrics["penalty_loss"] = penalty_loss
        if self.sae.activation.has_threshold:
            metrics["threshold"] = float(self.sae.threshold)
        if self.precision.scaler is not None:
            metrics["loss_scale"] = self.precision.scale
            metrics["skipped_steps"] = float(self.precision.scaler.skipped_steps)
        return metrics

    def _loss_error(self, loss: Tensor, check_now: bool) -> FloatingPointError | None:
        """The error for a loss that is not finite. A sync-free step does not
        read its loss every step (that read would make the host wait for the GPU): a device flag
        gathers every step's, read at log steps and before each checkpoint (`check_loss`), so a
        run stops there, before any checkpoint holds the bad weights."""
        if self._step_fn.sync_free:  # (never with data parallelism: `supports_sync_free`)
            bad = ~torch.isfinite(loss)
            self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad
            return self.check_loss(raise_=False) if check_now else None
        if bool(torch.isfinite(loss)):
            return None
        return FloatingPointError(
            f"loss became {loss.item()} at step {self.step}; lower train.lr or enable train.clip_grad_norm"
        )

    def check_loss(self, raise_: bool = True) -> FloatingPointError | None:
        """Read the sync-free steps' non-finite-loss flag (one host read): the error, raised
        or returned, when a loss since the last check was not finite."""
        if self._bad_loss is None:
            return None
        bad, self._bad_loss = bool(self._bad_loss), None
        first, self._loss_checked_at = self._loss_checked_at, self.step
        if not bad:
            return None
        error = FloatingPointError(
            f"loss became non-finite between steps {first} and {self.step} (train.sync_free reads it at log "
            "steps); lower train.lr or enable train.clip_grad_norm"
        )
        if raise_:
            raise error
        return error

    def _planned_micro_batches(self, rows: int) -> int:
        """`micro_batches="auto"`: the memory planner's fewest chunks for this device's memory."""
        if self.micro_batches != "auto":
            return int(self.micro_batches)
        if self.device.type == "cuda":
            device_bytes = torch.cuda.get_device_properties(self.device).total_memory
        else:
            device_bytes = psutil.virtual_memory().total
        tp = self.tp.size if self.tp is not None else 1
        dp = self.dp.size if self.dp is not None else 1
        plan = auto_micro_batches(
            self.n_global,
            self.sae.cfg.d_in,
            self.sae.cfg.k,
            tp * dp,
            tp,
            rows * dp,
            ema=self.ema is not None,
            device_gib=device_bytes / 2**30,
            precision=self.precision.name,
            k_aux=self.sae.cfg.k_aux,
        )
        self.micro_batches = plan.micro_batches
        return plan.micro_batches

    def _agreed_overflow(self, overflow: bool) -> bool:
        """fp16: whether any rank's low-precision products overflowed (one all-reduce MAX of one
        int); every rank then updates its loss scale alike. Always False in bf16/fp32."""
        scaler = self.precision.scaler
        if scaler is None:
            return False
        if self._distributed():
            flag = torch.tensor([int(overflow)], dtype=torch.int64, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            overflow = bool(flag.item())
        if overflow and scaler.scale <= 1.0:  # not the backward's range: the forward overflows fp16
            raise FloatingPointError(
                f"fp16 overflowed at step {self.step} with the loss scale at 1: the pre-activations exceed "
                "fp16's range (65504); use train.precision=bf16 or fp32"
            )
        scaler.update(overflow)
        return overflow

    def _skip_step(self, rows: int, stats: StepStats) -> None:
        """An fp16 overflow on some rank: no optimiser update anywhere; the batch counts as seen
        (the data position stays that of a normal step, and the dead-latent counters, already
        advanced by the step, keep this batch's firings)."""
        self.step += 1
        self.tokens_seen += rows * (self.dp.size if self.dp is not None else 1)
        self._window_tokens += rows
        self._fire_counts += stats.fire_counts
        print0(f"step {self.step}: fp16 overflow, step skipped; loss scale now {self.precision.scale:g}")
        return None  # the next logged step reports loss_scale and skipped_steps

    @torch.no_grad()
    def _grad_norm(self) -> Tensor:
        """Global gradient norm: latent-sharded parameters summed over the TP group, the
        replicated b_pre counted once (gradients are already averaged over replicas)."""
        grads = [self.sae.W_enc.grad, self.sae.b_enc.grad, self.sae.W_dec.grad]
        shards = max(self.shard_threads, 1)  # shard threads: summed per rank, in rank order, as TP does
        sq = sum(
            torch.stack(torch._foreach_norm([g.chunk(shards)[r] for g in grads])).double().pow(2).sum().reshape(1)
            for r in range(shards)
        )
        if self.tp is not None:
            self.tp.all_reduce_(sq)
        return (sq[0] + self.sae.b_pre.grad.double().pow(2).sum()).sqrt().float()

    def _comm(self) -> tuple[float, int]:
        handles = [h for h in (self.tp, self.dp) if h is not None]
        return sum(h.stats.seconds for h in handles), sum(h.stats.bytes_sent for h in handles)

    def fit(
        self,
        batches: Iterable[Tensor],
        max_steps: int | None = None,
        checkpointer: Checkpointer | None = None,
        on_step: Callable[[int], None] | None = None,
        stop_requested: Callable[[], bool] | None = None,
    ) -> TrainSummary:
        """Train on this rank's batches until they end (on any rank) or `max_steps` (total,
        counting restored steps). Logs every `log_every` steps (with the data-wait / compute /
        communication split), draws the latent-density histogram every `histogram_every`,
        checkpoints every `checkpoint_every` steps (or, with "auto", at the Young/Daly interval:
        `train.cadence`). A `checkpointer` passed here also gets a final save
        (`final=True`, which the Ray service uses for its last report); the trainer's own
        (`checkpoint_url`) saves at the end only when `checkpoint_every` is set.
        `on_step(step)` runs after each step (the service's fault-injection hook).
        `stop_requested()` is asked before each step (a preemption notice): when it is true on
        any rank, every rank stops at that step boundary and takes the final checkpoint there
        (`summary.preempted`)."""
        explicit = checkpointer is not None
        checkpointer = checkpointer or self.checkpointer
        summary = self.summary = TrainSummary(steps=self.step, tokens=self.tokens_seen)
        iterator = iter(batches)
        window, window_start = StepTimes(), time.perf_counter()
        last_saved = None
        cadence = CheckpointCadence.of(self.cfg.checkpoint_every, self.cfg.checkpoint_mtbf_s, self.step)
        since_save = StepTimes()  # the steps since the last checkpoint: auto's step time
        while_writing = StepTimes()  # those of them that ran while its background write was in flight
        writing = getattr(checkpointer, "writing", None)
        try:
            while max_steps is None or self.step < max_steps:
                t0 = time.perf_counter()
                overlaps_write = writing is not None and writing()
                try:
                    batch, error = next(iterator, None), None
                except Exception as exc:  # noqa: BLE001 - a failed read must stop every rank, not hang them
                    batch, error = None, exc
                t1 = time.perf_counter()
                stop = stop_requested is not None and stop_requested()
                has_all, stopping = self.agree_step(batch is not None, error or self._batch_error(batch), stop)
                if not has_all:
                    if self._distributed():
                        print0(f"data ended at step {self.step}; stopping every rank there")
                    break
                if stopping:
                    print0(
                        f"stop requested (a preemption notice, or an elastic run growing back): every rank stops at step {self.step} and checkpoints there"
                    )
                    summary.preempted = True
                    break
                comm0, bytes0 = self._comm()
                batch = batch.to(self.device, non_blocking=True)  # NCCL gathers device tensors only
                x = self.tp.all_gather_rows(batch) if self.tp is not None else batch
                metrics = self._checked_step(x)
                if metrics is not None or not self._step_fn.sync_free:
                    # CUDA: the step's kernels have finished. A sync-free step waits only at log
                    # steps, so the host runs ahead; the window's times are right in total
                    synchronize(self.device)
                t2 = time.perf_counter()
                comm1, bytes1 = self._comm()
                first = summary.totals.steps == 0
                one = StepTimes(
                    data_wait=0.0 if first else t1 - t0,
                    startup_wait=t1 - t0 if first else 0.0,
                    compute=(t2 - t1) - (comm1 - comm0),
                    comm=comm1 - comm0,
                    comm_bytes=bytes1 - bytes0,
                    steps=1,
                    tokens=x.shape[0] * (self.dp.size if self.dp is not None else 1),
                )
                window.add(one)
                summary.totals.add(one)
                since_save.add(one)
                if overlaps_write:
                    while_writing.add(one)
                if metrics is not None:
                    metrics.update(window.as_metrics(time.perf_counter() - window_start))
                    self.logger.log(metrics, self.step)
                    summary.final = metrics
                    summary.history.append({"step": float(self.step), **metrics})
                    window, window_start = StepTimes(), time.perf_counter()
                if self.step % self.cfg.histogram_every == 0:
                    self._log_density_histogram()
                if on_step is not None:
                    on_step(self.step)
                if checkpointer is not None and cadence.due(self.step) and (max_steps is None or self.step < max_steps):
                    # what the last checkpoint cost: its stall, and the steps its write slowed
                    overhead, step_s = cadence.write_overhead(
                        since_save.steps, since_save.seconds, while_writing.steps, while_writing.seconds
                    )
                    stall = self._timed_save(checkpointer)
                    last_saved = self.step
                    since_save, while_writing = StepTimes(), StepTimes()
                    before = cadence.interval_steps
                    interval = cadence.saved(self.step, stall + overhead, step_s, self._max_over_ranks)
                    if interval is not None and (before is None or abs(interval - before) > 0.25 * before):
                        print0(
                            f"checkpoint_every=auto: every {interval} steps from step {self.step} (a checkpoint "
                            f"stalls {stall:.2f} s and its write slows training {overhead:.2f} s, a step "
                            f"takes {step_s:.3g} s, MTBF {self.cfg.checkpoint_mtbf_s:g} s)"
                        )
                    summary.checkpoint_every = interval
        finally:
            summary.steps, summary.tokens = self.step, self.tokens_seen
        self.check_loss()  # a sync-free run's last steps, before the final checkpoint or the caller's use
        if checkpointer is not None and (explicit or (self.cfg.checkpoint_every and last_saved != self.step)):
            self._timed_save(checkpointer, final=True)
        return summary

    def _timed_save(self, checkpointer: Checkpointer, final: bool = False) -> float:
        """One checkpoint; returns how long it held training up (counted in the summary)."""
        start = time.perf_counter()
        checkpointer.save(self, final=final)
        stall = time.perf_counter() - start
        self.summary.checkpoint_stall_s += stall
        self.summary.checkpoints += 1
        return stall

    def _max_over_ranks(self, values: list[float]) -> list[float]:
        """Each value's maximum over the ranks (a decision every rank must share)."""
        if not self._distributed():
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.tolist()

    def _log_density_histogram(self) -> None:
        if self._window_tokens == 0:
            return
        density = self._fire_counts.double() / self._window_tokens
        self.logger.log_histogram("latent_density_log10", torch.log10(density + 1e-10), self.step)
        self.logger.log({"frac_latents_unfired_in_window": (density == 0).double().mean().item()}, self.step)
        self._fire_counts.zero_()
        self._window_tokens = 0

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def eval_weights(self) -> dict[str, Tensor]:
        """The weights to evaluate/export: the bias-corrected EMA when enabled."""
        names = ["W_enc", "b_enc", "W_dec", "b_pre"]
        if self.ema is None:
            return {n: p.detach() for n, p in zip(names, self.params)}
        averaged = self.ema.averaged()
        w_dec = averaged[2]
        averaged[2] = w_dec / torch.linalg.vector_norm(w_dec, dim=1, keepdim=True).clamp_min(1e-12)
        return dict(zip(names, averaged))

    # ----------------------------------------------------------- checkpoints
    def snapshot_info(self) -> dict[str, Any]:
        """The JSON part of a checkpoint: counters, loss constant, configs, Adam's settings."""
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "mse_scale": self.mse_scale,
            "ema_steps": self.ema.steps if self.ema is not None else 0,
            "train_cfg": self.cfg.to_dict(),
            "sae_cfg": self.global_sae_cfg.to_dict(),
            "precision": self.precision.name,  # resolved; a resume may run in another one
            "loss_scale": self.precision.scaler.state_dict() if self.precision.scaler is not None else None,
            "adam_param_groups": [
                {k: v for k, v in g.items() if k != "params"} for g in self.optimizer.state_dict()["param_groups"]
            ],
        }

    def snapshot(self) -> TrainerSnapshot:
        self.check_loss()  # a sync-free run's deferred loss check: never checkpoint bad weights
        tensors: dict[str, Tensor] = {"dead.tokens_since_fired": self.tracker.tokens_since_fired}
        for pid, st in self.optimizer.state_dict()["state"].items():
            for key, value in st.items():
                tensors[f"adam.{pid}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
        if self.ema is not None:
            tensors.update(self.ema.state_dict())
        tensors["rng.cpu"] = torch.get_rng_state()
        return TrainerSnapshot(tensors=tensors, info=self.snapshot_info())

    def save_checkpoint(self) -> str:
        if self.checkpointer is None:
            raise ValueError("no checkpoint_url configured")
        return self.checkpointer.save(self)

    def restore(self, step: int | None = None) -> int:
        """Load the latest checkpoint (if any); returns the step to continue from (0 if none)."""
        if self.checkpointer is None:
            return 0
        return self.checkpointer.restore(self, step)

    def load_snapshot(self, snap: TrainerSnapshot) -> int:
        """Restore everything but the weights (already loaded into `self.sae`) from a snapshot."""
        info, tensors = snap.info, snap.tensors
        self.step, self.tokens_seen = int(info["step"]), int(info["tokens_seen"])
        self.mse_scale = float(info["mse_scale"])
        self.tracker.load_state_dict({"tokens_since_fired": tensors["dead.tokens_since_fired"]})
        state: dict[int, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("adam."):
                _, pid, name = key.split(".", 2)
                state.setdefault(int(pid), {})[name] = value
        groups = [dict(g, params=[i for i in range(len(self.params))]) for g in info["adam_param_groups"]]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        if self.ema is not None:
            self.ema.load_state_dict(tensors, int(info["ema_steps"]))
        torch.set_rng_state(tensors["rng.cpu"])
        if self.precision.scaler is not None and info.get("loss_scale"):
            self.precision.scaler.load_state_dict(info["loss_scale"])
        if info.get("precision", self.precision.name) != self.precision.name:
            print0(f"resuming a {info['precision']} checkpoint in {self.precision.name}")
        self._make_step_fn()
        return self.step
