"""Load a causal LM from a Hugging Face id, a local directory, a GGUF file, or the embedded default.

GGUF files are dequantised by transformers (slow: ~30 s for SmolLM2) once, then kept as a
safetensors copy in the cache directory and reloaded from there in well under a second.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass

import torch

from saescale.lm.embedded import EMBEDDED_MODEL, smollm2_gguf_path

FINGERPRINT_BYTES = 2**20  # a GGUF is identified by its size and its first and last MiB


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message says which and why."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str  # what the user asked for (recorded in manifests and SAE metadata)


def default_cache_dir() -> str:
    return os.environ.get("SAESCALE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "saescale"))


def _gguf_cache_path(gguf_path: str, cache_dir: str) -> str:
    """Keyed by the file's content (size and its first and last MiB), not its location, so every
    checkout or virtualenv with the same GGUF shares one converted copy."""
    size = os.path.getsize(gguf_path)
    digest = hashlib.sha256(str(size).encode())
    with open(gguf_path, "rb") as handle:
        digest.update(handle.read(FINGERPRINT_BYTES))
        handle.seek(max(0, size - FINGERPRINT_BYTES))
        digest.update(handle.read(FINGERPRINT_BYTES))
    base = os.path.splitext(os.path.basename(gguf_path))[0]
    return os.path.join(cache_dir, "models", f"{base}-{digest.hexdigest()[:16]}")


def _convert_gguf(gguf_path: str, out_dir: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    cfg = quantised.config.to_dict()
    cfg.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(type(quantised.config).from_dict(cfg), dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    try:
        os.replace(tmp, out_dir)  # the converted copy appears only when complete
    except OSError:
        if not os.path.isdir(out_dir):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same conversion first


def resolve_model_dir(spec: str, cache_dir: str | None = None) -> str:
    """A local directory loadable by `from_pretrained` (converting GGUF once), or the HF id."""
    cache_dir = cache_dir or default_cache_dir()
    if spec == EMBEDDED_MODEL:
        spec = smollm2_gguf_path()
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise ModelLoadError(f"GGUF file not found: {spec}")
        out = _gguf_cache_path(spec, cache_dir)
        if not os.path.isdir(out):
            print(f"converting {os.path.basename(spec)} to safetensors once (cached at {out}) ...", flush=True)
            _convert_gguf(spec, out)
        return out
    return spec


def load_causal_lm(spec: str, cache_dir: str | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_dir(spec, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load model {spec!r}: {str(exc).splitlines()[0]} "
            "(expected a Hugging Face id, a local model directory, a .gguf file, or "
            f"{EMBEDDED_MODEL})"
        ) from exc
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec)
