"""What a latent does, read off the weights: its logit effects and its nearest latents.

Logit effects (as sae_vis, SAEDashboard and Neuronpedia compute them): the latent's decoder
direction through the model's final norm and unembedding, W_U (g * d), where g is the final
norm's gain (for a LayerNorm, d is first centred, as its mean subtraction does). The norm's
division by the residual's scale is left out: it depends on the position, and it is a positive
factor that changes no ranking. The direction is taken in the model's units (the SAE's input
normalisation is a positive scale or a per-token one, so the direction is the decoder row).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from saescale.core.model import TopKSAE
from saescale.lm.hooks import first_module


class EffectsError(ValueError):
    """The model's final norm or unembedding could not be found."""


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm before the unembedding of Llama/Mistral/Qwen, GPT-2 and GPT-NeoX-style models."""
    return first_module(model, ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.final_layernorm"))


def logit_directions(model: nn.Module, directions: Tensor) -> Tensor:
    """[m, d] residual-stream directions -> [m, vocab] logit effects (see the module docstring)."""
    unembed = model.get_output_embeddings()
    if unembed is None or not hasattr(unembed, "weight"):
        raise EffectsError(f"{type(model).__name__} has no output embedding to read logit effects from")
    d = directions.float()
    norm = final_norm(model)
    if norm is not None:
        if isinstance(norm, nn.LayerNorm) or getattr(norm, "bias", None) is not None:
            d = d - d.mean(dim=-1, keepdim=True)
        gain = getattr(norm, "weight", None)
        if gain is not None:
            d = d * gain.detach().float()
    return d @ unembed.weight.detach().float().t()


@torch.no_grad()
def logit_effects(model: nn.Module, sae: TopKSAE, latents: list[int], top: int = 10, chunk: int = 256) -> list[dict]:
    """Per latent: the `top` tokens it promotes most and suppresses most (token ids and effects)."""
    out = []
    for i in range(0, len(latents), chunk):
        ids = torch.tensor(latents[i : i + chunk], dtype=torch.long)
        logits = logit_directions(model, sae.W_dec.detach()[ids])
        up = logits.topk(min(top, logits.shape[1]), dim=1)
        down = (-logits).topk(min(top, logits.shape[1]), dim=1)
        for r in range(len(ids)):
            out.append(
                {
                    "promoted": list(zip(up.indices[r].tolist(), up.values[r].tolist())),
                    "suppressed": list(zip(down.indices[r].tolist(), (-down.values[r]).tolist())),
                }
            )
    return out


@torch.no_grad()
def decoder_neighbours(
    sae: TopKSAE, latents: list[int], top: int = 8, chunk: int = 1 << 16
) -> list[list[tuple[int, float]]]:
    """Per latent, the `top` other latents whose decoder directions have the largest cosine with
    its own, scanning all latents in chunks (never an n x n matrix)."""
    w = sae.W_dec.detach().float()
    w = w / torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min(1e-12)
    ids = torch.tensor(latents, dtype=torch.long)
    query = w[ids]
    best_v = torch.full((len(latents), top), -2.0)
    best_i = torch.full((len(latents), top), -1, dtype=torch.long)
    for start in range(0, w.shape[0], chunk):
        cos = query @ w[start : start + chunk].t()
        cols = torch.arange(start, start + cos.shape[1])
        cos[cols[None, :] == ids[:, None]] = -2.0  # not itself
        v = torch.cat([best_v, cos], dim=1)
        i = torch.cat([best_i, cols.expand(len(latents), -1)], dim=1)
        keep = v.topk(min(top, v.shape[1]), dim=1)
        best_v, best_i = keep.values, i.gather(1, keep.indices)
    # -2 marks "none" (itself, or fewer other latents than `top`)
    return [
        [(int(i), float(v)) for i, v in zip(ri, rv) if i >= 0 and v > -2]
        for ri, rv in zip(best_i.tolist(), best_v.tolist())
    ]
