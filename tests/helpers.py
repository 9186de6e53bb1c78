"""Shared test helpers (importable from test modules and from processes they spawn)."""

from __future__ import annotations

import torch

from saescale.core.config import SAEConfig
from saescale.core.model import TopKSAE


def perturbed_sae(cfg: SAEConfig, generator: torch.Generator) -> TopKSAE:
    """An SAE with the paper's init, then encoder, biases and b_pre perturbed so that encoder
    and decoder gradients differ and every bias gets a gradient."""
    sae = TopKSAE(cfg)
    sae.reset_parameters(generator=generator)
    with torch.no_grad():
        sae.W_enc.add_(0.05 * torch.randn(sae.W_enc.shape, generator=generator))
        sae.b_enc.copy_(0.1 * torch.randn(sae.b_enc.shape, generator=generator))
        sae.b_pre.copy_(0.1 * torch.randn(sae.b_pre.shape, generator=generator))
    return sae
