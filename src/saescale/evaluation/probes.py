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


@torch.no_grad()
def best_1d_probe(features: Tensor, labels: Tensor, iters: int = 25, l2: float = 1e-4) -> tuple[int, float]:
    """features [tokens, n_latents], labels [tokens] in {0, 1}: the latent whose 1-D logistic
    probe has the lowest training cross-entropy, and that cross-entropy."""
    y = labels.double()
    f = features.double()
    f = (f - f.mean(0)) / f.std(0).clamp_min(1e-8)
    n = f.shape[1]
    rate = y.mean().clamp(1e-6, 1 - 1e-6)
    w = torch.zeros(n, dtype=torch.float64)
    c = torch.full((n,), torch.log(rate / (1 - rate)).item(), dtype=torch.float64)
    for _ in range(iters):
        p = torch.sigmoid(f * w + c)
        r = p - y[:, None]
        s = p * (1 - p)
        g_w, g_c = (r * f).mean(0) + l2 * w, r.mean(0)
        h_ww, h_wc, h_cc = (s * f * f).mean(0) + l2, (s * f).mean(0), s.mean(0) + 1e-9
        det = (h_ww * h_cc - h_wc * h_wc).clamp_min(1e-12)
        w = w - (h_cc * g_w - h_wc * g_c) / det
        c = c - (h_ww * g_c - h_wc * g_w) / det
    z = f * w + c
    loss = (torch.nn.functional.softplus(z) - y[:, None] * z).mean(0)  # BCE with logits
    best = int(loss.argmin())
    return best, float(loss[best])


def probe_losses(features: Tensor, tasks: dict[str, Tensor], min_positives: int = 5) -> list[ProbeResult]:
    """Best-probe loss per task (tasks with too few positives or negatives are skipped)."""
    out = []
    for name, labels in tasks.items():
        positives = int(labels.sum())
        if positives < min_positives or labels.numel() - positives < min_positives:
            continue
        rate = positives / labels.numel()
        prior = -(rate * torch.log(torch.tensor(rate)) + (1 - rate) * torch.log(torch.tensor(1 - rate))).item()
        latent, loss = best_1d_probe(features, labels)
        out.append(ProbeResult(name, positives, labels.numel(), latent, loss, prior))
    return out
