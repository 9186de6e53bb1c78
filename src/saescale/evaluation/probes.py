"""Probe loss (Gao et al. 2024, section 4.2): for each binary token-level task, the best 1-D
logistic probe over all latents' pre-activations; lower cross-entropy means some single latent
tracks the hypothesised feature. Reported per task and averaged over tasks.

All latents are fitted at once: each latent's (weight, bias) is one 2x2 Newton system, solved in
closed form for every latent together (features standardised first, a little L2 for stability).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor


@dataclass
class ProbeResult:
    task: str
    positives: int
    tokens: int
    best_latent: int
    probe_loss: float  # mean cross-entropy (nats) of the best latent's probe
    prior_loss: float  # cross-entropy of predicting the base rate alone

    def to_dict(self) -> dict:
        return asdict(self)


# latents fitted together: the Newton step's [tokens, chunk] float64 temporaries (8 MB at 4096
# tokens) stay in cache and are reused by the allocator. The whole [tokens, n_latents] at once
# (128 MB each at 4096 x 4096) went to fresh pages on every operation: `jobs/eval.py` spent twice
# its user time in the kernel faulting them in (186M page faults, 5.5 of its 9.5 CPU-minutes)
LATENT_CHUNK = 256


def standardize(features: Tensor) -> Tensor:
    """Each latent's pre-activations to zero mean and unit variance, in float64."""
    f = features.double()
    return (f - f.mean(0)) / f.std(0).clamp_min(1e-8)


def _probe_losses(f: Tensor, y: Tensor, logit: float, iters: int, l2: float) -> Tensor:
    """The training cross-entropy of each column's 1-D probe: `iters` Newton steps from the
    base rate, f [tokens, latents] standardised, y [tokens] in {0, 1} as float64."""
    n = f.shape[1]
    w = torch.zeros(n, dtype=torch.float64)
    c = torch.full((n,), logit, dtype=torch.float64)
    y = y[:, None]
    for _ in range(iters):
        p = torch.sigmoid(f * w + c)
        r = p - y
        s = p.mul_(1 - p)  # p is not needed past here
        sf = s * f
        g_w, g_c = (r * f).mean(0) + l2 * w, r.mean(0)
        h_ww, h_wc, h_cc = (sf * f).mean(0) + l2, sf.mean(0), s.mean(0) + 1e-9
        det = (h_ww * h_cc - h_wc * h_wc).clamp_min(1e-12)
        w = w - (h_cc * g_w - h_wc * g_c) / det
        c = c - (h_ww * g_c - h_wc * g_w) / det
    z = f * w + c
    return (torch.nn.functional.softplus(z) - y * z).mean(0)  # BCE with logits


@torch.no_grad()
def best_1d_probe(
    features: Tensor, labels: Tensor, iters: int = 25, l2: float = 1e-4, *, standardized: bool = False
) -> tuple[int, float]:
    """features [tokens, n_latents] (`standardized`: already through `standardize`), labels
    [tokens] in {0, 1}: the latent whose 1-D logistic probe has the lowest training
    cross-entropy, and that cross-entropy. Latents are fitted `LATENT_CHUNK` at a time; each
    latent's fit is independent of the others."""
    f = features.double() if standardized else standardize(features)
    y = labels.double()
    rate = y.mean().clamp(1e-6, 1 - 1e-6)
    logit = torch.log(rate / (1 - rate)).item()
    loss = torch.cat(
        [
            _probe_losses(f[:, i : i + LATENT_CHUNK].contiguous(), y, logit, iters, l2)
            for i in range(0, f.shape[1], LATENT_CHUNK)
        ]
    )
    best = int(loss.argmin())
    return best, float(loss[best])


def probe_losses(features: Tensor, tasks: dict[str, Tensor], min_positives: int = 5) -> list[ProbeResult]:
    """Best-probe loss per task (tasks with too few positives or negatives are skipped); the
    features are standardised once for all tasks."""
    out = []
    standardized = None
    for name, labels in tasks.items():
        positives = int(labels.sum())
        if positives < min_positives or labels.numel() - positives < min_positives:
            continue
        if standardized is None:
            standardized = standardize(features)
        rate = positives / labels.numel()
        prior = -(rate * torch.log(torch.tensor(rate)) + (1 - rate) * torch.log(torch.tensor(1 - rate))).item()
        latent, loss = best_1d_probe(standardized, labels, standardized=True)
        out.append(ProbeResult(name, positives, labels.numel(), latent, loss, prior))
    return out
