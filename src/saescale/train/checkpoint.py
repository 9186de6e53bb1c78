"""Training checkpoints on any fsspec URL, written so that a crash leaves the last good one.

Layout under the run's checkpoint root:
    step_000001000/sae.safetensors + cfg.json      the SAE (a loadable saved SAE)
    step_000001000/trainer_state.safetensors       Adam moments, dead-latent counters, EMA, RNG
    step_000001000/trainer_state.json              step, tokens seen, loss constants, configs
    latest.json                                    {"step": 1000, "dir": "step_000001000"}

Every file is published atomically, and `latest.json` is written last: a checkpoint that was
being written when the process died is never referenced, and is overwritten on the next try.
No pickle: tensors are safetensors, everything else JSON.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from saescale import storage
from saescale.formats.saved import load_sae_tensors, save_sae
from saescale.core.model import TopKSAE

LATEST = "latest.json"


@dataclass
class TrainerSnapshot:
    """Everything besides the weights that a resumed run needs to continue exactly."""

    tensors: dict[str, torch.Tensor]
    info: dict[str, Any]


def step_dir(step: int) -> str:
    return f"step_{step:09d}"


def save_checkpoint(
    root: str,
    step: int,
    sae: TopKSAE,
    snapshot: TrainerSnapshot,
    storage_options: dict[str, Any] | None = None,
    keep_last: int | None = 2,
) -> str:
    url = storage.join(root, step_dir(step))
    save_sae(sae, url, metadata={"step": step}, storage_options=storage_options)
    tensors = {k: v.detach().contiguous().cpu() for k, v in snapshot.tensors.items()}
    storage.write_file_atomic(
        storage.join(url, "trainer_state.safetensors"), lambda p: save_file(tensors, p), storage_options
    )
    storage.write_json_atomic(storage.join(url, "trainer_state.json"), snapshot.info, storage_options)
    previous = latest_step(root, storage_options)
    storage.write_json_atomic(storage.join(root, LATEST), {"step": step, "dir": step_dir(step)}, storage_options)
    if keep_last is not None:
        _prune(root, keep_last, storage_options, protect={step, previous} - {None})
    return url


def latest_step(root: str, storage_options: dict[str, Any] | None = None) -> int | None:
    url = storage.join(root, LATEST)
    if not storage.exists(url, storage_options):
        return None
    return int(storage.read_json(url, storage_options)["step"])


def load_checkpoint(
    root: str, sae: TopKSAE, step: int | None = None, storage_options: dict[str, Any] | None = None
) -> TrainerSnapshot | None:
    """Load the latest (or a given) checkpoint's weights into `sae`; None if there is none."""
    if step is None:
        step = latest_step(root, storage_options)
        if step is None:
            return None
    url = storage.join(root, step_dir(step))
    with tempfile.TemporaryDirectory(prefix="saescale-ckpt-") as tmp:
        weights = load_file(
            storage.local_copy(storage.join(url, "sae.safetensors"), os.path.join(tmp, "sae.safetensors"), storage_options)
        )
        state = load_file(
            storage.local_copy(
                storage.join(url, "trainer_state.safetensors"), os.path.join(tmp, "state.safetensors"), storage_options
            )
        )
    load_sae_tensors(sae, weights)
    info = storage.read_json(storage.join(url, "trainer_state.json"), storage_options)
    return TrainerSnapshot(tensors=state, info=info)


def _prune(root: str, keep_last: int, storage_options: dict[str, Any] | None, protect: set[int]) -> None:
    fs, path = storage.url_to_fs(root, storage_options)
    try:
        entries = [os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return
    steps = sorted(int(e[5:]) for e in entries if e.startswith("step_") and e[5:].isdigit())
    for s in steps[:-keep_last] if keep_last > 0 else steps:
        if s not in protect:
            storage.remove_tree(storage.join(root, step_dir(s)), storage_options)
