"""Ablation sparsity (Gao et al. 2024, section 4.5): are a latent's downstream effects sparse?

At a token position p the SAE's reconstruction is spliced into the language model at the hooked
site. Each latent active at p is ablated in turn (its term removed from the reconstruction at p
only) and the logits recomputed. Over the next T positions (p .. p+T-1) the logit differences
(ablated minus un-ablated) have their median over the vocabulary subtracted per position (a
constant shift does not change the softmax), are flattened to v of length V*T, and scored
(||v||_1 / ||v||_2)^2 / (V*T): the effective fraction of (position, token) logits affected. It lies
in [1/(V*T), 1]; smaller is sparser. Reported as the mean over (position, latent) pairs; pairs whose
ablation changes nothing (v = 0) are counted as skipped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from saescale.core.model import TopKCode, TopKSAE
from saescale.evaluation.downstream import replace_output
from saescale.lm.hooks import run_to_hook


@dataclass
class AblationSparsity:
    mean: float  # mean (L1/L2)^2 / (V*T) over scored (position, latent) pairs
    pairs: int  # scored pairs
    skipped: int  # pairs whose ablation left every logit unchanged (up to a constant)
    positions: int
    horizon: int

    def to_dict(self) -> dict:
        return asdict(self)


def effect_sparsity(delta: Tensor) -> float:
    """(||v||_1/||v||_2)^2 / numel for logit differences `delta` [T, V] after subtracting each
    position's median; NaN when nothing changed."""
    if delta.ndim != 2 or delta.numel() == 0:
        raise ValueError(f"logit differences must be [positions, vocab], got shape {tuple(delta.shape)}")
    v = (delta.double() - delta.double().median(dim=-1, keepdim=True).values).flatten()
    l2 = v.norm()
    if l2 == 0:
        return float("nan")
    return float((v.abs().sum() / l2) ** 2 / v.numel())


def _logits_with_site(model: nn.Module, ids: Tensor, site: str, layer: int, replacement: Tensor) -> Tensor:
    with replace_output(model, site, layer, lambda h: replacement.to(h.dtype)):
        return model(input_ids=ids, use_cache=False).logits.float()


@torch.no_grad()
def ablation_sparsity(
    model: nn.Module,
    sae: TopKSAE,
    windows: Tensor,
    site: str,
    layer: int,
    positions: list[tuple[int, int]],
    horizon: int = 16,
) -> AblationSparsity:
    """`positions`: (window index, token position) pairs of `windows` [n, seq] to ablate at."""
    if horizon < 1:
        raise ValueError(f"the horizon T must be at least 1 (got {horizon})")
    if not positions:
        raise ValueError("ablation sparsity needs at least one position")
    scores: list[float] = []
    skipped = 0
    for w, p in positions:
        if not 0 <= p < windows.shape[1]:
            raise ValueError(f"position {p} is outside the windows' {windows.shape[1]} tokens")
        ids = windows[w : w + 1, : min(p + horizon, windows.shape[1])]
        h = run_to_hook(model, ids, site, layer).float()[0]  # [L, d]
        x_normed, info = sae.normalize(h)
        code = sae.encode_normed(x_normed)
        recon = sae.denormalize(sae.decode_normed(code), info)  # [L, d]
        active = (code.values[p] > 0).nonzero().flatten()
        if active.numel() == 0:
            continue
        # row 0: the spliced reconstruction; row 1+j: the same with latent active[j] removed at p
        values_p = code.values[p].expand(active.numel(), -1).clone()
        values_p[torch.arange(active.numel()), active] = 0.0
        ablated_code = TopKCode(values_p, code.indices[p].expand(active.numel(), -1).contiguous())
        info_p = None if info is None else tuple(t[p : p + 1].expand(active.numel(), -1) for t in info)
        ablated_p = sae.denormalize(sae.decode_normed(ablated_code), info_p)  # [A, d]
        batch = recon.unsqueeze(0).repeat(active.numel() + 1, 1, 1)
        batch[1:, p] = ablated_p
        logits = _logits_with_site(model, ids.expand(batch.shape[0], -1), site, layer, batch)
        window = logits[:, p : p + horizon]  # the ablated position and the ones after it
        for j in range(active.numel()):
            score = effect_sparsity(window[1 + j] - window[0])
            if score != score:
                skipped += 1
            else:
                scores.append(score)
    mean = sum(scores) / len(scores) if scores else float("nan")
    return AblationSparsity(mean=mean, pairs=len(scores), skipped=skipped, positions=len(positions), horizon=horizon)
