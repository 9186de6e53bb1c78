"""Import SAEs that others released or trained: OpenAI's, SAELens folders, sparsify folders.

Each becomes a `TopKSAE` (our layout: W_enc [n, d], b_enc [n], W_dec [n, d], b_pre [d]) that
computes what the source library computes, so every saescale tool (eval, features, exports) works
on it. What TopKSAE cannot express (a JumpReLU with per-latent thresholds, a transcoder, a skip
connection) is refused with the reason, never approximated.

- OpenAI (openai/sparse_autoencoder, a torch state dict `.pt`, read with `weights_only=True`):
  `pre_bias` [d], `encoder.weight` [n, d], `latent_bias` [n], `decoder.weight` [d, n],
  `activation` "TopK" | "ReLU", `activation_state_dict` {"k"}; TopK files expect layer-normed
  inputs, x' = (x - mean) / (std + 1e-5) per token (unbiased std), and de-normalise the output:
  our `layer_norm` normalisation. ReLU files (the v1/v4 L1 SAEs) take raw inputs: `relu`, with
  no normalisation.
- SAELens v6 folder (cfg.json + sae_weights.safetensors; W_enc [d, n], W_dec [n, d], b_enc, b_dec):
  "topk", "standard" (ReLU) and "jumprelu" with one threshold on every latent (what SAELens saves
  a BatchTopK SAE as: our `batchtopk`), normalize_activations none | layer_norm.
- Imported ReLU SAEs carry no L1 coefficient (l1_coef 0): they evaluate, and a fine-tune must
  set sae.l1_coef.
- sparsify folder (cfg.json + sae.safetensors; encoder.weight [n, d], encoder.bias, W_dec [n, d],
  b_dec), e.g. one hookpoint's folder of a sparsify checkpoint.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from saescale import storage
from saescale.core.config import SAEConfig
from saescale.core.model import TopKSAE
from saescale.formats.common import SAELENS_ARCHITECTURES, SavedSAEError, read_safetensors

FORMATS = ("saescale", "saelens", "sparsify", "openai")
# SAELens architecture -> ours (SAELens saves a BatchTopK SAE for inference as a JumpReLU)
_SAELENS_ARCHITECTURES = {theirs: ours for ours, theirs in SAELENS_ARCHITECTURES.items()}
TEST_TIME_K = 32  # an imported ReLU or JumpReLU SAE's sae.k: only the default of test-time TopK


class ForeignSAEError(SavedSAEError):
    """A file or folder that is not an SAE saescale can import; the message says why."""


def _fail(where: str, why: str) -> ForeignSAEError:
    return ForeignSAEError(f"{storage.redact(where)}: {why}")


def detect_format(url: str, storage_options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any] | None]:
    """Which of FORMATS the file or folder at `url` holds (by its files and its cfg.json), and
    that cfg.json's content (None for OpenAI's file), so that no reader fetches it again."""
    if url.endswith((".pt", ".pth")):
        return "openai", None
    cfg_url = storage.join(url, "cfg.json")
    if not storage.exists(cfg_url, storage_options):
        raise _fail(url, "no cfg.json (a saescale, SAELens or sparsify folder) and not a .pt file (OpenAI's format)")
    cfg = storage.read_json(cfg_url, storage_options)
    if str(cfg.get("format", "")).startswith("saescale."):
        return "saescale", cfg
    if "architecture" in cfg and "d_sae" in cfg:
        return "saelens", cfg
    if "num_latents" in cfg or "expansion_factor" in cfg:
        return "sparsify", cfg
    raise _fail(url, f"cfg.json is not saescale's, SAELens' or sparsify's (keys {sorted(cfg)[:8]})")


def _tensors(url: str, name: str, storage_options: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in read_safetensors(storage.join(url, name), storage_options).items()}


def _build(cfg: SAEConfig, w_enc, b_enc, w_dec, b_pre, where: str) -> TopKSAE:
    n, d = cfg.n_latents, cfg.d_in
    for name, tensor, shape in (("W_enc", w_enc, (n, d)), ("b_enc", b_enc, (n,)), ("W_dec", w_dec, (n, d))):
        if tuple(tensor.shape) != shape:
            raise _fail(where, f"{name} has shape {tuple(tensor.shape)}, expected {shape} from its config")
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(w_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(w_dec)
        sae.b_pre.copy_(b_pre)
    return sae


def read_openai(
    url: str, storage_options: dict[str, Any] | None = None, raw: dict[str, Any] | None = None
) -> tuple[TopKSAE, dict[str, Any]]:
    """`raw` is unused: OpenAI's file has no cfg.json (the readers share one signature)."""
    with tempfile.TemporaryDirectory(prefix="saescale-import-") as tmp:
        local = storage.local_copy(url, os.path.join(tmp, "ae.pt"), storage_options)
        try:
            state = torch.load(local, map_location="cpu", weights_only=True)  # tensors, str, dict only
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
            raise _fail(url, f"not a state dict torch loads with weights_only=True ({exc})") from None
    missing = {"pre_bias", "encoder.weight", "latent_bias", "decoder.weight"} - set(state)
    if missing:
        raise _fail(url, f"lacks {sorted(missing)}: not OpenAI's autoencoder state dict")
    activation = state.get("activation", "ReLU")
    n, d = state["encoder.weight"].shape
    if activation == "ReLU":  # OpenAI normalises only TopK models' inputs ("hacky", says its code)
        cfg = SAEConfig(d_in=d, n_latents=n, k=min(TEST_TIME_K, n), architecture="relu", normalization="none")
    elif activation == "TopK":
        k = int(state.get("activation_state_dict", {}).get("k", 0))
        if not 0 < k <= n:
            raise _fail(url, f"activation_state_dict has k={k}, expected 1..{n}")
        cfg = SAEConfig(d_in=d, n_latents=n, k=k, normalization="layer_norm")
    else:
        raise _fail(url, f"a {activation} autoencoder: saescale imports OpenAI's TopK and ReLU SAEs")
    sae = _build(
        cfg,
        state["encoder.weight"].float(),
        state["latent_bias"].float(),
        state["decoder.weight"].float().t(),
        state["pre_bias"].float(),
        url,
    )
    return sae, {"source_format": "openai", "source": storage.redact(url)}


def read_saelens(
    url: str, storage_options: dict[str, Any] | None = None, raw: dict[str, Any] | None = None
) -> tuple[TopKSAE, dict[str, Any]]:
    if raw is None:  # its cfg.json, unless detect_format read it already
        raw = storage.read_json(storage.join(url, "cfg.json"), storage_options)
    arch = raw.get("architecture")
    if arch not in _SAELENS_ARCHITECTURES:
        raise _fail(url, f"a SAELens {arch!r} SAE: saescale imports topk, standard (ReLU) and jumprelu")
    norm = raw.get("normalize_activations", "none")
    if norm not in ("none", "layer_norm"):
        raise _fail(url, f"normalize_activations={norm!r}: saescale imports none and layer_norm")
    if raw.get("apply_b_dec_to_input", True) is False or raw.get("rescale_acts_by_decoder_norm"):
        raise _fail(url, "apply_b_dec_to_input=false or rescale_acts_by_decoder_norm: not a plain TopK SAE")
    t = _tensors(url, "sae_weights.safetensors", storage_options)
    n = int(raw["d_sae"])
    ours = _SAELENS_ARCHITECTURES[arch]
    k = int(raw["k"]) if arch == "topk" else min(TEST_TIME_K, n)
    cfg = SAEConfig(d_in=int(raw["d_in"]), n_latents=n, k=k, architecture=ours, normalization=norm)
    sae = _build(cfg, t["W_enc"].t(), t["b_enc"], t["W_dec"], t["b_dec"], url)
    if arch == "jumprelu":
        threshold = t["threshold"].reshape(-1)
        if threshold.numel() != n or not bool((threshold == threshold[0]).all()):
            raise _fail(
                url,
                "a JumpReLU SAE with per-latent thresholds: saescale's JumpReLU inference is BatchTopK's, "
                "one threshold for every latent (a SAELens BatchTopK SAE is saved that way)",
            )
        with torch.no_grad():
            sae.threshold.fill_(float(threshold[0]))
    meta = dict(raw.get("metadata") or {})
    return sae, {k: meta[k] for k in ("model_name", "hook_name", "context_size") if k in meta} | {
        "source_format": "saelens",
        "source": storage.redact(url),
    }


def read_sparsify(
    url: str, storage_options: dict[str, Any] | None = None, raw: dict[str, Any] | None = None
) -> tuple[TopKSAE, dict[str, Any]]:
    if raw is None:  # its cfg.json, unless detect_format read it already
        raw = storage.read_json(storage.join(url, "cfg.json"), storage_options)
    if raw.get("activation", "topk") != "topk" or raw.get("transcode") or raw.get("skip_connection"):
        raise _fail(url, "a sparsify transcoder, skip connection or non-TopK activation: not a plain TopK SAE")
    t = _tensors(url, "sae.safetensors", storage_options)
    n, d = t["encoder.weight"].shape
    cfg = SAEConfig(d_in=int(d), n_latents=int(n), k=int(raw["k"]), normalization="none")
    sae = _build(cfg, t["encoder.weight"], t["encoder.bias"], t["W_dec"], t["b_dec"], url)
    return sae, {"source_format": "sparsify", "source": storage.redact(url)}


# format -> reader(url, storage_options, the cfg.json detect_format read); formats.saved.load_sae dispatches
READERS = {"openai": read_openai, "saelens": read_saelens, "sparsify": read_sparsify}
