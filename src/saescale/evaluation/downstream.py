"""Downstream loss: splice the SAE's reconstruction into the language model at the hooked site
and measure what the model loses (Gao et al. 2024, section 4.1).

Reported over the same windows: the clean next-token cross-entropy, the cross-entropy with the
reconstruction spliced in, with the site zero-ablated (the scale: how much that site matters),
and the KL divergence from the clean next-token distribution to the spliced one. Positions whose
token was dropped from the cache (BOS and other special tokens) keep their clean activation:
the SAE never saw them in training.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saescale.core.model import TopKSAE
from saescale.lm.hooks import hook_module


@dataclass
class DownstreamLoss:
    tokens: int  # predicted tokens
    ce_clean: float
    ce_spliced: float
    ce_zero_ablation: float
    ce_increase: float  # spliced - clean
    kl_clean_to_spliced: float  # mean over predicted tokens, nats
    ce_recovered: float  # 1 - increase / (zero-ablation - clean): 1 is perfect, 0 is no better than zero

    def to_dict(self) -> dict:
        return asdict(self)


@contextmanager
def replace_output(model: nn.Module, site: str, layer: int, fn: Callable[[Tensor], Tensor]):
    """While active, the hooked module's output h [batch, seq, d] becomes fn(h)."""
    module = hook_module(model, site, layer)

    def hook(_mod, _inp, out):
        if isinstance(out, tuple):
            return (fn(out[0]),) + tuple(out[1:])
        return fn(out)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _logits(model: nn.Module, input_ids: Tensor) -> Tensor:
    return model(input_ids=input_ids, use_cache=False).logits.float()


@torch.no_grad()
def downstream_loss(
    model: nn.Module,
    sae: TopKSAE,
    windows: Tensor,
    site: str,
    layer: int,
    keep_mask: Tensor | None = None,
    batch_size: int = 16,
) -> DownstreamLoss:
    """windows: [n, seq] token ids; keep_mask [n, seq]: positions whose activation is replaced
    (default all)."""
    if keep_mask is None:
        keep_mask = torch.ones_like(windows, dtype=torch.bool)
    sums = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl": 0.0}
    count = 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size]
        mask = keep_mask[start : start + batch_size].unsqueeze(-1)
        targets = ids[:, 1:].reshape(-1)

        def spliced(h: Tensor, mask: Tensor = mask) -> Tensor:
            recon = sae(h.reshape(-1, h.shape[-1]).float()).reshape(h.shape).to(h.dtype)
            return torch.where(mask, recon, h)

        clean = _logits(model, ids)[:, :-1]
        with replace_output(model, site, layer, spliced):
            spl = _logits(model, ids)[:, :-1]
        with replace_output(model, site, layer, lambda h, mask=mask: torch.where(mask, torch.zeros_like(h), h)):
            zero = _logits(model, ids)[:, :-1]
        vocab = clean.shape[-1]
        sums["clean"] += F.cross_entropy(clean.reshape(-1, vocab), targets, reduction="sum").item()
        sums["spliced"] += F.cross_entropy(spl.reshape(-1, vocab), targets, reduction="sum").item()
        sums["zero"] += F.cross_entropy(zero.reshape(-1, vocab), targets, reduction="sum").item()
        log_p, log_q = F.log_softmax(clean, -1), F.log_softmax(spl, -1)
        sums["kl"] += (log_p.exp() * (log_p - log_q)).sum().item()
        count += targets.numel()
    clean, spl, zero = (sums[k] / count for k in ("clean", "spliced", "zero"))
    span = zero - clean
    return DownstreamLoss(
        tokens=count,
        ce_clean=clean,
        ce_spliced=spl,
        ce_zero_ablation=zero,
        ce_increase=spl - clean,
        kl_clean_to_spliced=sums["kl"] / count,
        ce_recovered=1.0 - (spl - clean) / span if span != 0 else float("nan"),
    )
