"""Optimiser pieces of the recipe: Adam, the lr schedule, the unit-norm decoder, the weight EMA."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from saescale.core.config import TrainConfig

PROJECTION_CHUNK_BYTES = 4 * 2**20  # decoder rows projected at a time: a few MiB stays in cache


def make_adam(params: list[nn.Parameter], cfg: TrainConfig, lr: float) -> torch.optim.Adam:
    """Adam(0.9, 0.999), eps 6.25e-10; the fused kernel (~7x faster on CPU) where available."""
    kwargs = dict(lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # pragma: no cover - device without a fused Adam
        return torch.optim.Adam(params, foreach=True, **kwargs)


def lr_at(step: int, base_lr: float, cfg: TrainConfig) -> float:
    """Constant lr (the paper's default), with optional linear warmup and linear decay to zero."""
    scale = 1.0
    if cfg.warmup_steps and step < cfg.warmup_steps:
        scale = (step + 1) / cfg.warmup_steps
    if cfg.decay_start_frac is not None and cfg.total_steps:
        start = int(cfg.decay_start_frac * cfg.total_steps)
        if step >= start:
            scale *= max(0.0, (cfg.total_steps - step) / max(1, cfg.total_steps - start))
    return base_lr * scale


@torch.no_grad()
def remove_parallel_grad_(w_dec: Tensor, grad: Tensor) -> None:
    """Project out each decoder row's gradient component along the (unit-norm) row.

    Adam would otherwise spend its step growing the norm that the renormalisation undoes.
    Done in row chunks so no temporary the size of W_dec is allocated (and chunks stay in cache).
    """
    rows = max(1, PROJECTION_CHUNK_BYTES // max(1, w_dec.shape[1] * w_dec.element_size()))
    for start in range(0, w_dec.shape[0], rows):
        w, g = w_dec[start : start + rows], grad[start : start + rows]
        dots = (g * w).sum(dim=1, keepdim=True)
        g.addcmul_(w, dots, value=-1.0)


class WeightEMA:
    """Exponential moving average of the weights, bias-corrected like Adam's moments.

    The corrected average is sum_t (1-b) b^(T-t) w_t / (1 - b^T): unbiased from the first step.
    """

    def __init__(self, params: list[Tensor], decay: float) -> None:
        self.decay = decay
        self.steps = 0
        self.shadow = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def update(self, params: list[Tensor]) -> None:
        self.steps += 1
        torch._foreach_lerp_(self.shadow, [p.detach() for p in params], 1.0 - self.decay)

    @torch.no_grad()
    def averaged(self) -> list[Tensor]:
        correction = 1.0 - self.decay**self.steps
        return [s / correction for s in self.shadow]

    def state_dict(self) -> dict[str, Tensor | int]:
        out: dict[str, Tensor | int] = {f"ema.{i}": s for i, s in enumerate(self.shadow)}
        return out

    def load_state_dict(self, tensors: dict[str, Tensor], steps: int) -> None:
        for i, s in enumerate(self.shadow):
            s.copy_(tensors[f"ema.{i}"])
        self.steps = steps
