"""The training loop. It consumes any iterable of [batch, d_in] activation tensors and knows
nothing of language models, Ray or storage formats (checkpoints go through `saescale.train.checkpoint`).

Per step: normalise inputs, sparse forward/backward (`saescale.train.step`), remove the decoder-parallel
gradient, optional clipping, Adam, renormalise decoder rows, optional EMA.

Resuming: `restore()` loads the latest checkpoint; the caller then feeds the batches that follow
the `step` it returns (e.g. `itertools.islice(batches, trainer.step, None)` for a replayable
source): a resumed run then reproduces the uninterrupted one to float tolerance.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from saescale.train import checkpoint
from saescale.core.config import TrainConfig
from saescale.train.dead_latents import DeadLatentTracker
from saescale.train.loggers import MetricsLogger, NullLogger
from saescale.core.model import TopKSAE, check_activations
from saescale.train.optim import WeightEMA, lr_at, make_adam, remove_parallel_grad_
from saescale.distributed.parallel import DataParallel, TensorParallel
from saescale.train.step import SparseTopKStep


@dataclass
class TrainSummary:
    steps: int
    tokens: int
    final: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


class Trainer:
    def __init__(
        self,
        sae: TopKSAE,
        cfg: TrainConfig,
        logger: MetricsLogger | None = None,
        checkpoint_url: str | None = None,
        storage_options: dict[str, Any] | None = None,
        keep_history: bool = True,
        tp: TensorParallel | None = None,
        dp: DataParallel | None = None,
    ) -> None:
        """With `tp`, `sae` is this rank's slice of the latents; with `dp`, each batch passed to
        `train_step` is this replica's part of the global batch (see `saescale.distributed.parallel`)."""
        self.sae = sae
        self.tp = tp
        self.dp = dp if dp is not None and dp.size > 1 else None
        self.n_global = tp.n_global if tp is not None else sae.cfg.n_latents
        self.cfg = cfg
        self.logger = logger or NullLogger()
        self.checkpoint_url = checkpoint_url
        self.storage_options = storage_options
        self.keep_history = keep_history
        self.device = sae.W_enc.device
        self.params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_pre]
        self.base_lr = cfg.resolved_lr(self.n_global)
        self.optimizer = make_adam(self.params, cfg, self.base_lr)
        self.tracker = DeadLatentTracker(sae.cfg.n_latents, sae.cfg.dead_tokens_threshold, self.device)
        self.ema = WeightEMA(self.params, cfg.ema_decay) if cfg.ema_decay else None
        self.step = 0
        self.tokens_seen = 0
        self.mse_scale: float | None = None
        self._step_fn: SparseTopKStep | None = None
        self._fire_counts = torch.zeros(sae.cfg.n_latents, dtype=torch.long, device=self.device)
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
        self._step_fn = SparseTopKStep(self.sae, self.mse_scale, self.tracker, tp=self.tp, dp=self.dp)

    # ------------------------------------------------------------- training
    def train_step(self, batch: Tensor) -> dict[str, float] | None:
        """One optimiser step; returns logged metrics on logging steps, else None."""
        if self._step_fn is None:
            self.initialize(batch)
        assert self._step_fn is not None
        x = batch.to(self.device, torch.float32, non_blocking=True)
        check_activations(x, self.sae.cfg.d_in, name=f"batch at step {self.step}")
        t0 = time.perf_counter()
        x_normed, _ = self.sae.normalize(x)
        logging_now = (self.step + 1) % self.cfg.log_every == 0
        stats = self._step_fn(x_normed, compute_fvu=logging_now)
        if not torch.isfinite(stats.loss):
            raise FloatingPointError(
                f"loss became {stats.loss.item()} at step {self.step}; lower train.lr or enable train.clip_grad_norm"
            )
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
        batch_tokens = x.shape[0]
        self.step += 1
        self.tokens_seen += batch_tokens * (self.dp.size if self.dp is not None else 1)
        self._fire_counts += torch.bincount(stats.fired, minlength=self.sae.cfg.n_latents)
        self._window_tokens += batch_tokens
        self._step_seconds = time.perf_counter() - t0
        if not logging_now:
            return None
        replica = torch.stack([stats.loss, stats.mse_loss, stats.fvu, stats.auxk_loss, stats.l0,
                               stats.multi_topk_loss]).float()
        if self.dp is not None:  # means over the replicas' equal parts = means over the batch
            self.dp.all_reduce_(replica).div_(self.dp.size)
        loss, mse_loss, fvu, auxk_loss, l0, multi_loss = replica.tolist()
        metrics = {
            "loss": loss,
            "mse_loss": mse_loss,
            "fvu": fvu,
            "auxk_loss": auxk_loss,
            "l0": l0,
            "dead_fraction": stats.n_dead / self.n_global,
            "lr": lr,
            "grad_norm": float(gnorm) if gnorm is not None else float("nan"),
            "tokens": float(self.tokens_seen),
        }
        if self.sae.cfg.multi_topk:
            metrics["multi_topk_loss"] = multi_loss
        return metrics

    @torch.no_grad()
    def _grad_norm(self) -> Tensor:
        """Global gradient norm: latent-sharded parameters summed over the TP group, the
        replicated b_pre counted once (gradients are already averaged over replicas)."""
        sharded = torch.stack(torch._foreach_norm([self.sae.W_enc.grad, self.sae.b_enc.grad, self.sae.W_dec.grad]))
        sq = sharded.double().pow(2).sum().reshape(1)
        if self.tp is not None:
            self.tp.all_reduce_(sq)
        return (sq[0] + self.sae.b_pre.grad.double().pow(2).sum()).sqrt().float()

    def fit(self, batches: Iterable[Tensor], max_steps: int | None = None) -> TrainSummary:
        """Train until `batches` is exhausted or `max_steps` (total, counting restored steps)."""
        summary = TrainSummary(steps=self.step, tokens=self.tokens_seen)
        window_start, window_tokens, data_wait = time.perf_counter(), 0, 0.0
        iterator = iter(batches)
        try:
            while max_steps is None or self.step < max_steps:
                t_wait = time.perf_counter()
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                data_wait += time.perf_counter() - t_wait
                metrics = self.train_step(batch)
                window_tokens += batch.shape[0]
                if metrics is not None:
                    elapsed = time.perf_counter() - window_start
                    metrics["tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
                    metrics["data_wait_frac"] = data_wait / max(elapsed, 1e-9)
                    self.logger.log(metrics, self.step)
                    summary.final = metrics
                    if self.keep_history:
                        summary.history.append({"step": float(self.step), **metrics})
                    window_start, window_tokens, data_wait = time.perf_counter(), 0, 0.0
                if self.step % self.cfg.histogram_every == 0:
                    self._log_density_histogram()
                if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                    self.save_checkpoint()
        finally:
            summary.steps, summary.tokens = self.step, self.tokens_seen
        return summary

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
    def snapshot(self) -> checkpoint.TrainerSnapshot:
        opt_state = self.optimizer.state_dict()
        tensors: dict[str, Tensor] = {"dead.tokens_since_fired": self.tracker.tokens_since_fired}
        for pid, st in opt_state["state"].items():
            for key, value in st.items():
                tensors[f"adam.{pid}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
        if self.ema is not None:
            tensors.update(self.ema.state_dict())
        tensors["rng.cpu"] = torch.get_rng_state()
        info = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "mse_scale": self.mse_scale,
            "ema_steps": self.ema.steps if self.ema is not None else 0,
            "train_cfg": self.cfg.to_dict(),
            "sae_cfg": self.sae.cfg.to_dict(),
            "adam_param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt_state["param_groups"]],
        }
        return checkpoint.TrainerSnapshot(tensors=tensors, info=info)

    def save_checkpoint(self) -> str:
        if not self.checkpoint_url:
            raise ValueError("no checkpoint_url configured")
        return checkpoint.save_checkpoint(
            self.checkpoint_url, self.step, self.sae, self.snapshot(), storage_options=self.storage_options
        )

    def restore(self, step: int | None = None) -> int:
        """Load the latest checkpoint (if any); returns the step to continue from (0 if none)."""
        if not self.checkpoint_url:
            return 0
        snap = checkpoint.load_checkpoint(self.checkpoint_url, self.sae, step, self.storage_options)
        if snap is None:
            return 0
        return self.load_snapshot(snap)

    def load_snapshot(self, snap: checkpoint.TrainerSnapshot) -> int:
        """Restore everything but the weights (already loaded into `self.sae`) from a snapshot."""
        info, tensors = snap.info, snap.tensors
        if info["sae_cfg"] != self.sae.cfg.to_dict():
            raise ValueError("checkpoint was written for a different SAE config; use a new run name")
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
        self._make_step_fn()
        return self.step
