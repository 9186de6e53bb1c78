"""Per-rank checkpoint shards of a latent-sharded run, and the streamed export of the full SAE.

A checkpoint is one folder. Each TP rank of DP replica 0 writes its own slice (no rank ever
gathers the latents), DP replicas hold identical copies and write nothing:

    tp00000-of-00002.sae.safetensors     W_enc, b_enc, W_dec rows of this slice; b_pre, input_scale
    tp00000-of-00002.state.safetensors   its Adam moments, dead-latent counters, EMA, RNG
    meta.json                            step, tokens, data position, configs, mesh (rank 0)

Under Ray Train the folder is a local temp dir that `ray.train.report` uploads; Ray registers
the checkpoint only after every rank reported, so a crash mid-save leaves the previous one as the
latest.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from saescale import storage
from saescale.train.checkpoint import TrainerSnapshot
from saescale.core.config import SAEConfig
from saescale.distributed.mesh import ParallelDims
from saescale.formats.saved import CONFIG_FILE, FORMAT, WEIGHTS_FILE, load_sae_tensors, sae_tensors
from saescale.train.trainer import Trainer

META = "meta.json"


def shard_name(tp_rank: int, tp: int) -> str:
    return f"tp{tp_rank:05d}-of-{tp:05d}"


def save_rank_shard(
    directory: str, trainer: Trainer, dims: ParallelDims, rank: int, sae_cfg: SAEConfig, extra: dict[str, Any]
) -> None:
    """Write this rank's part of a checkpoint into a local folder (see module docstring)."""
    dp_rank, tp_rank = dims.coords(rank)
    snap = trainer.snapshot()
    if dp_rank == 0:
        base = os.path.join(directory, shard_name(tp_rank, dims.tp))
        _save_local(sae_tensors(trainer.sae), base + ".sae.safetensors")
        _save_local({k: v.detach().contiguous().cpu() for k, v in snap.tensors.items()}, base + ".state.safetensors")
        if trainer.ema is not None:  # the weights to export: bias-corrected EMA (all per-row ops)
            _save_local(sae_tensors(trainer.sae, trainer.eval_weights()), base + ".eval.safetensors")
    if rank == 0:
        meta = {"format": "saescale.sharded-checkpoint.v1", "dp": dims.dp, "tp": dims.tp,
                "sae_cfg_global": sae_cfg.to_dict(), "trainer": snap.info, **extra}
        tmp = os.path.join(directory, f".{META}.tmp")
        with open(tmp, "w") as handle:
            json.dump(meta, handle, indent=2, sort_keys=True)
        os.replace(tmp, os.path.join(directory, META))


def _save_local(tensors: dict[str, torch.Tensor], path: str) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    save_file(tensors, tmp)
    os.replace(tmp, path)


def read_meta(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, META)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} holds no {META}: not a saescale sharded checkpoint")
    with open(path) as handle:
        return json.load(handle)


def load_rank_shard(directory: str, trainer: Trainer, dims: ParallelDims, rank: int) -> dict[str, Any]:
    """Load this rank's slice into `trainer` (weights, Adam, counters, EMA, RNG); returns meta."""
    meta = read_meta(directory)
    if meta["tp"] != dims.tp:
        raise ValueError(
            f"checkpoint was written with tp={meta['tp']}, this run has tp={dims.tp}; resharding a "
            f"checkpoint is not supported: resume with parallel.tp={meta['tp']}"
        )
    _, tp_rank = dims.coords(rank)
    base = os.path.join(directory, shard_name(tp_rank, dims.tp))
    load_sae_tensors(trainer.sae, load_file(base + ".sae.safetensors"))
    tensors = load_file(base + ".state.safetensors")
    trainer.load_snapshot(TrainerSnapshot(tensors=tensors, info=meta["trainer"]))
    return meta


# ------------------------------------------------------------------------------ export
def _header(entries: list[tuple[str, str, list[int]]], metadata: dict[str, str]) -> bytes:
    """A safetensors header for tensors laid out back to back in `entries` order."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in entries:
        size = 4 * max(1, _numel(shape))  # every tensor here is F32
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def _numel(shape: list[int]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out if shape else 1


def export_gathered(
    checkpoint_url: str, out_url: str, metadata: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write the full SAE (a folder `load_sae` reads) from a sharded checkpoint, one tensor of
    one shard in memory at a time: the safetensors file is streamed shard by shard in rank
    order, which is exactly the full matrices' row order. Remote shards are fetched once per
    large tensor, so local disk holds the output plus one shard, never the whole checkpoint."""
    meta = json.loads(storage.read_bytes(storage.join(checkpoint_url, META), storage_options))
    cfg = SAEConfig.from_dict(meta["sae_cfg_global"])
    tp, n, d = meta["tp"], cfg.n_latents, cfg.d_in
    kind = "eval" if storage.exists(storage.join(checkpoint_url, f"{shard_name(0, tp)}.eval.safetensors"),
                                    storage_options) else "sae"  # the EMA weights when the run kept them
    entries = [("W_enc", "F32", [n, d]), ("b_enc", "F32", [n]), ("W_dec", "F32", [n, d]),
               ("b_pre", "F32", [d]), ("input_scale", "F32", [])]
    with tempfile.TemporaryDirectory(prefix="saescale-export-") as tmp:
        out_path = os.path.join(tmp, WEIGHTS_FILE)
        with open(out_path, "wb") as out:
            out.write(_header(entries, {"format": FORMAT}))
            for name, _, _ in entries:
                replicated = name in ("b_pre", "input_scale")
                for rank in range(1 if replicated else tp):
                    # one shard file on local disk and one of its tensors in memory at a time
                    url = storage.join(checkpoint_url, f"{shard_name(rank, tp)}.{kind}.safetensors")
                    path = storage.local_copy(url, os.path.join(tmp, "shard.safetensors"), storage_options)
                    with safe_open(path, framework="pt") as handle:
                        out.write(handle.get_tensor(name).contiguous().float().numpy().tobytes())
                    if path.startswith(tmp):
                        os.remove(path)
        storage.write_file_atomic(storage.join(out_url, WEIGHTS_FILE), lambda p: shutil.move(out_path, p), storage_options)
    body = {"format": FORMAT, "sae": cfg.to_dict(), "metadata": metadata or {}}
    storage.write_json_atomic(storage.join(out_url, CONFIG_FILE), body, storage_options)
    return out_url
