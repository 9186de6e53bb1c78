"""Reconstruction metrics on held-out activations (Gao et al. 2024, section 4.1).

NMSE is the MSE over the variance of the data (the mean squared distance to the data's mean), so
a constant predictor scores 1; the fraction of variance explained is 1 - NMSE. Dead latents here
are latents that never fire on the evaluation tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from saescale.core.model import TopKSAE


@dataclass
class ReconstructionMetrics:
    tokens: int
    nmse: float
    fve: float  # fraction of variance explained = 1 - nmse
    l0: float  # mean number of nonzero latents per token
    dead_fraction: float  # latents that never fired on these tokens
    mean_activation: float  # mean value of the nonzero latent activations
    density_log10: list[float]  # per latent log10(fraction of tokens it fires on), -10 if never

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def nmse(x_hat: Tensor, x: Tensor) -> float:
    """Normalised MSE: squared error over the variance of x about its mean (1 = predicting the mean)."""
    x_hat, x = x_hat.float(), x.float()
    return ((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-30)).item()


# the most pre-activations one evaluation batch holds (float32: 512 MiB): at 2^24 latents a
# batch of 4096 rows would be a 256 GiB [rows, n_latents] pre-activation
PREACT_BUDGET_ELEMS = 2**27


@torch.no_grad()
def reconstruction_metrics(
    sae: TopKSAE, acts: Tensor, batch_size: int = 4096, k: int | None = None, with_density: bool = True
) -> ReconstructionMetrics:
    """Streams `acts` [tokens, d] through the SAE in batches of at most `batch_size` rows and at
    most PREACT_BUDGET_ELEMS pre-activations (no [tokens, n_latents] tensor). `k`: the top-k at
    this test-time k instead of the trained one (the paper's progressive recovery: a Multi-TopK
    SAE degrades gracefully above its k, plain TopK does not). `with_density=False` leaves
    `density_log10` empty (a Python list of n_latents floats: 16M of them at the paper's size)."""
    batch_size = max(1, min(batch_size, PREACT_BUDGET_ELEMS // sae.cfg.n_latents))
    acts = acts.float()
    mean = acts.mean(0)
    sq_err = total_var = nnz_sum = act_sum = 0.0
    fires = torch.zeros(sae.cfg.n_latents, dtype=torch.long)
    for start in range(0, acts.shape[0], batch_size):
        x = acts[start : start + batch_size]
        code = sae.encode(x, k)
        x_hat = sae.denormalize(sae.decode_normed(code), sae.normalize(x)[1])
        sq_err += (x_hat - x).pow(2).sum().item()
        total_var += (x - mean).pow(2).sum().item()
        active = code.values > 0
        nnz_sum += active.sum().item()
        act_sum += code.values[active].sum().item()
        fires += torch.bincount(code.indices[active], minlength=sae.cfg.n_latents)
    tokens = acts.shape[0]
    nmse = sq_err / max(total_var, 1e-30)
    density = fires.double() / max(tokens, 1)
    log_density = torch.where(density > 0, torch.log10(density.clamp_min(1e-30)), torch.full_like(density, -10.0))
    return ReconstructionMetrics(
        tokens=tokens,
        nmse=nmse,
        fve=1.0 - nmse,
        l0=nnz_sum / max(tokens, 1),
        dead_fraction=(fires == 0).double().mean().item(),
        mean_activation=act_sum / max(nnz_sum, 1),
        density_log10=log_density.tolist() if with_density else [],
    )
