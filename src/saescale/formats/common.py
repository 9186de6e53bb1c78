"""What every format module shares, kept at the bottom of `formats` so that the readers, the
saved folder and the exporters all import it and none of them imports another to get it: the
error a bad SAE file raises, the safetensors reader, and the architecture names SAELens uses."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
from safetensors.torch import load_file

from saescale import storage

# our architecture -> SAELens' (BatchTopK infers as a JumpReLU at its threshold, as in SAELens)
SAELENS_ARCHITECTURES = {"topk": "topk", "relu": "standard", "batchtopk": "jumprelu"}


class SavedSAEError(ValueError):
    """A saved SAE folder is missing files or holds tensors that disagree with its config."""


def read_safetensors(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file at any fsspec URL (a remote one through a temp copy)."""
    with tempfile.TemporaryDirectory(prefix="saescale-load-") as tmp:
        local = storage.local_copy(url, os.path.join(tmp, os.path.basename(url) or "weights"), storage_options)
        return load_file(local)
