"""Export to the folder formats of the peer libraries, so our SAEs drop into their tooling.

* SAELens (v6):  cfg.json + sae_weights.safetensors, W_enc [d_in, d_sae], W_dec [d_sae, d_in]
* EleutherAI sparsify: cfg.json + sae.safetensors, encoder.weight [M, d_in], W_dec [M, d_in]

Both compute topk(relu(W_enc (x - b_dec) + b_enc)) on raw activations, so our `dataset_scale`
normalisation is folded into the weights: with x' = s x, the top-k indices are unchanged and
  b_enc -> b_enc / s,  b_dec -> b_pre / s,  W_enc and W_dec unchanged (decoder stays unit norm),
which reproduces our reconstruction exactly. Per-token unit-norm inputs cannot be folded and
are refused with an explanation. SAELens metadata names the hook the TransformerLens way
(`blocks.8.hook_resid_post`), not our cache's `resid_post.8`.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from safetensors.torch import save_file

from saescale.core.model import TopKSAE


class ExportError(ValueError):
    """The SAE cannot be represented in the requested format."""


# our cache's hook sites (saescale.lm.hooks.HOOK_SITES) -> TransformerLens hook point in blocks.L
_TL_HOOKS = {"resid_post": "hook_resid_post", "mlp_out": "hook_mlp_out", "attn_out": "hook_attn_out"}
_OUR_HOOK = re.compile(r"(?P<site>[a-z_]+)\.(?P<layer>\d+)")


def transformer_lens_hook_name(hook: str) -> str:
    """`resid_post.8` -> `blocks.8.hook_resid_post` (what SAELens users look SAEs up by); any
    other form, e.g. a name that already is a TransformerLens hook, is returned unchanged."""
    match = _OUR_HOOK.fullmatch(hook)
    if match is None or match["site"] not in _TL_HOOKS:
        return hook
    return f"blocks.{int(match['layer'])}.{_TL_HOOKS[match['site']]}"


def folded_weights(sae: TopKSAE) -> dict[str, torch.Tensor]:
    """W_enc, b_enc, W_dec, b_dec acting on raw (un-normalised) activations."""
    mode = sae.cfg.normalization
    if mode == "token_unit_norm":
        raise ExportError(
            "this SAE normalises each token to unit norm, which SAELens and sparsify cannot express "
            "as weights; train with sae.normalization=dataset_scale (or none) to export"
        )
    scale = float(sae.input_scale) if mode == "dataset_scale" else 1.0
    with torch.no_grad():
        return {
            "W_enc": sae.W_enc.detach().float().cpu().clone(),
            "b_enc": (sae.b_enc.detach().float().cpu() / scale).clone(),
            "W_dec": sae.W_dec.detach().float().cpu().clone(),
            "b_dec": (sae.b_pre.detach().float().cpu() / scale).clone(),
        }


def _write_json(path: str, obj: dict[str, Any]) -> None:
    import json

    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(obj, handle, indent=2)
    os.replace(tmp, path)


def _save_tensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path + ".tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def export_saelens(sae: TopKSAE, out_dir: str, metadata: dict[str, Any] | None = None) -> str:
    """Write a SAELens v6 TopK folder, loadable with `sae_lens.SAE.load_from_disk(out_dir)`."""
    w = folded_weights(sae)
    os.makedirs(out_dir, exist_ok=True)
    meta = {
        "sae_lens_version": "6.0.0",
        "sae_lens_training_version": "6.0.0",
        "model_name": "unknown",
        "hook_name": "unknown",
        "context_size": 64,
        "prepend_bos": True,
        "exclude_special_tokens": True,
    }
    meta.update(metadata or {})
    meta["hook_name"] = transformer_lens_hook_name(str(meta["hook_name"]))
    cfg = {
        "architecture": "topk",
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.n_latents,
        "k": sae.cfg.k,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False,
        "metadata": meta,
    }
    tensors = {"W_enc": w["W_enc"].t().contiguous(), "b_enc": w["b_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]}
    _save_tensors(os.path.join(out_dir, "sae_weights.safetensors"), tensors)
    _write_json(os.path.join(out_dir, "cfg.json"), cfg)
    return out_dir


def export_sparsify(sae: TopKSAE, out_dir: str) -> str:
    """Write an EleutherAI sparsify folder, loadable with `sparsify.SparseCoder.load_from_disk`."""
    w = folded_weights(sae)
    os.makedirs(out_dir, exist_ok=True)
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, sae.cfg.n_latents // sae.cfg.d_in),
        "normalize_decoder": True,
        "num_latents": sae.cfg.n_latents,
        "k": sae.cfg.k,
        "multi_topk": sae.cfg.multi_topk,
        "skip_connection": False,
        "transcode": False,
        "d_in": sae.cfg.d_in,
    }
    tensors = {"encoder.weight": w["W_enc"], "encoder.bias": w["b_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]}
    _save_tensors(os.path.join(out_dir, "sae.safetensors"), tensors)
    _write_json(os.path.join(out_dir, "cfg.json"), cfg)
    return out_dir
