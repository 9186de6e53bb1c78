"""A plain dense autoencoder loss with autograd: the reference every fast path is tested
against, and the "naive" baseline of `saescale bench step`.

It materialises the dense [batch, n] latents and decodes with a dense matmul, exactly as the
peer libraries do by default. Same losses as `saescale.train.step` (see its docstring), for
every architecture: the code is the activation's `reference_latents`, plus its penalty (ReLU's L1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from saescale.core.arch import activation
from saescale.core.config import SAEConfig


def dense_losses(
    params: dict[str, Tensor],
    x: Tensor,
    cfg: SAEConfig,
    mse_scale: float,
    dead_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """Losses of one batch; `params` holds W_enc, b_enc, W_dec, b_pre (possibly requiring grad)."""
    W_enc, b_enc, W_dec, b_pre = params["W_enc"], params["b_enc"], params["W_dec"], params["b_pre"]
    batch, n = x.shape[0], cfg.n_latents
    pre = (x - b_pre) @ W_enc.t() + b_enc

    act = activation(cfg.architecture)
    z = act.reference_latents(pre, cfg)
    x_hat = z @ W_dec + b_pre
    main = mse_scale * (x_hat - x).pow(2).mean()
    out = {"mse_loss": main, "x_hat": x_hat, "latents": z}
    total = main
    out["penalty_loss"] = act.reference_penalty(z, cfg)  # ReLU's L1; 0 for the others
    total = total + out["penalty_loss"]
    if cfg.multi_topk:
        x_hat_wide = act.reference_latents(pre, cfg, k=cfg.multi_k) @ W_dec + b_pre
        multi = mse_scale * (x_hat_wide - x).pow(2).mean() / 8
        out["multi_topk_loss"] = multi
        total = total + multi
    if dead_mask is not None and bool(dead_mask.any()) and cfg.auxk_coef > 0:
        k_aux = min(cfg.k_aux, int(dead_mask.sum()))
        masked = pre.masked_fill(~dead_mask, float("-inf"))
        vals, idx = masked.topk(k_aux, dim=1)
        z_aux = torch.zeros(batch, n, dtype=pre.dtype, device=pre.device).scatter(1, idx, vals.relu())
        e_hat = z_aux @ W_dec
        residual = (x - x_hat).detach()
        var = (residual - residual.mean(0)).pow(2).mean()
        aux = cfg.auxk_coef * (e_hat - residual).pow(2).mean() / var
        aux = torch.nan_to_num(aux, nan=0.0, posinf=0.0, neginf=0.0)
        out["auxk_loss"] = aux
        total = total + aux
    out["loss"] = total
    return out
