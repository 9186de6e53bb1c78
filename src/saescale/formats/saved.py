"""The saved SAE: `sae.safetensors` + `cfg.json` in one folder at any fsspec URL.

Weights are safetensors only (no pickle anywhere); the folder is self-describing, so
`load_sae(url)` needs nothing but the URL. `load_sae` also imports a released or peer SAE, through
the readers of `formats.imports` (below this module: they never import it back).
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import save_file

from saescale import storage
from saescale.core.config import SAEConfig
from saescale.core.model import TopKSAE
from saescale.formats.common import SavedSAEError, read_safetensors  # also importable from here, as before
from saescale.formats.imports import READERS, detect_format

FORMAT = "saescale.topk.v1"
WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "cfg.json"


def sae_tensors(sae: TopKSAE, weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    params = weights if weights is not None else {n: p.detach() for n, p in sae.named_parameters()}
    out = {name: params[name].contiguous().cpu() for name in ("W_enc", "b_enc", "W_dec", "b_pre")}
    out["input_scale"] = sae.input_scale.detach().reshape(()).cpu()
    if sae.activation.has_threshold:  # BatchTopK's inference threshold (a JumpReLU at one value)
        out["threshold"] = sae.threshold.detach().reshape(()).cpu()
    return out


def save_sae(
    sae: TopKSAE,
    url: str,
    metadata: dict[str, Any] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Write the SAE (optionally other weights, e.g. the EMA) to the folder at `url`; config last."""
    tensors = sae_tensors(sae, weights)
    storage.write_file_atomic(
        storage.join(url, WEIGHTS_FILE), lambda p: save_file(tensors, p, metadata={"format": FORMAT}), storage_options
    )
    cfg = {"format": FORMAT, "sae": sae.cfg.to_dict(), "metadata": metadata or {}}
    storage.write_json_atomic(storage.join(url, CONFIG_FILE), cfg, storage_options)


def read_saved_config(
    url: str, storage_options: dict[str, Any] | None = None, raw: dict[str, Any] | None = None
) -> tuple[SAEConfig, dict[str, Any]]:
    """The config and metadata of the saved SAE folder at `url` (its cfg.json, written last;
    `raw`: that file's content when the caller has read it already)."""
    cfg_url = storage.join(url, CONFIG_FILE)
    if raw is None:
        if not storage.exists(cfg_url, storage_options):
            raise SavedSAEError(f"no {CONFIG_FILE} in {storage.redact(url)}: not a saved saescale SAE")
        raw = storage.read_json(cfg_url, storage_options)
    if raw.get("format") != FORMAT:
        raise SavedSAEError(f"{storage.redact(cfg_url)} has format {raw.get('format')!r}, expected {FORMAT!r}")
    return SAEConfig.from_dict(raw["sae"]), raw.get("metadata", {})


def load_sae(
    url: str, device: torch.device | str = "cpu", storage_options: dict[str, Any] | None = None
) -> tuple[TopKSAE, dict[str, Any]]:
    """Load a saved SAE; returns it with the metadata stored beside it. A released or peer SAE
    (OpenAI's .pt, a SAELens or sparsify folder) is imported instead (`formats.imports`)."""
    fmt, raw = detect_format(url, storage_options)  # reads cfg.json once, for every format
    if fmt != "saescale":
        sae, metadata = READERS[fmt](url, storage_options, raw)
        return sae.to(device), metadata
    cfg, metadata = read_saved_config(url, storage_options, raw)
    tensors = read_safetensors(storage.join(url, WEIGHTS_FILE), storage_options)
    sae = TopKSAE(cfg, device=device)
    load_sae_tensors(sae, tensors)
    return sae, metadata


@torch.no_grad()
def load_sae_tensors(sae: TopKSAE, tensors: dict[str, torch.Tensor]) -> None:
    expected = {name: tuple(p.shape) for name, p in sae.named_parameters()}
    expected["input_scale"] = ()
    if sae.activation.has_threshold:
        expected["threshold"] = ()
    missing = set(expected) - set(tensors)
    if missing:
        raise SavedSAEError(f"saved weights lack tensors {sorted(missing)}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise SavedSAEError(f"tensor {name} has shape {tuple(tensors[name].shape)}, config says {shape}")
    for name, p in sae.named_parameters():
        p.copy_(tensors[name])
    sae.input_scale.copy_(tensors["input_scale"].reshape(()))
    if "threshold" in expected:
        sae.threshold.copy_(tensors["threshold"].reshape(()))
