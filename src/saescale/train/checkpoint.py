"""The one training-checkpoint format: a folder of per-TP-rank shards, for every run.

A single-process run is the tp=1 case of the same format, so a checkpoint moves freely between
the local API and a Ray cluster, and between cluster sizes: loading reshards. Each TP rank of DP
replica 0 writes its contiguous slice of the latents (no rank ever gathers them); DP replicas
hold identical copies and write nothing:

    tp00000-of-00002.sae.safetensors     W_enc, b_enc, W_dec rows of this slice; b_pre, input_scale
    tp00000-of-00002.state.safetensors   its Adam moments, dead-latent counters, EMA, RNG
    tp00000-of-00002.eval.safetensors    the bias-corrected EMA weights (only when the run keeps one)
    meta.json                            format, mesh, step, tokens, configs, data position (rank 0)

`meta.json` is written last: a folder without it is not a checkpoint. Where the folders live is
the caller's business: `StorageCheckpointer` keeps `step_000001000/` folders plus `latest.json`
(written after the folder is complete) on any fsspec URL; under Ray Train the folder is a local
temp dir that `ray.train.report` uploads and registers once every rank reported.

Resharding: every latent-indexed tensor is a row slice along dim 0 of the global tensor, so a
rank at tp=b reads rows [r*n/b, (r+1)*n/b) from the source shards that overlap them (safetensors
slices: only those rows are read into memory). No pickle anywhere: safetensors and JSON.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from saescale import retry, storage
from saescale.core.arch import activation
from saescale.core.config import SAEConfig, TrainConfig
from saescale.core.model import TopKSAE
from saescale.distributed.parallel import DataParallel, TensorParallel
from saescale.formats.saved import CONFIG_FILE, FORMAT, WEIGHTS_FILE, load_sae_tensors, sae_tensors

CHECKPOINT_FORMAT = "saescale.checkpoint.v2"
META = "meta.json"
LATEST = "latest.json"
KEEP_LAST = 2  # checkpoints kept by a StorageCheckpointer (the newest and the one before)
# Train-config keys that may change between a checkpoint and its resume without changing the
# result: how often to log, draw histograms and checkpoint, and how long to train.
RESUMABLE_TRAIN_KEYS = frozenset(
    {"log_every", "histogram_every", "checkpoint_every", "checkpoint_mtbf_s", "total_steps", "precision"}
    | {"micro_batches"}
    | {"lr", "lr_rule", "budget_tokens"}  # compared as the lr they resolve to (check_resumable)
)

Fetch = Callable[[str], str]  # file name in a checkpoint folder -> local path holding it


class CheckpointError(ValueError):
    """A checkpoint is missing, of another format, or was written for another configuration."""


@dataclass
class TrainerSnapshot:
    """Everything besides the weights that a resumed run needs to continue exactly."""

    tensors: dict[str, torch.Tensor]
    info: dict[str, Any]


class Trainer(Protocol):
    """What a checkpoint reads from and restores into (`train.trainer.Trainer` is one)."""

    sae: TopKSAE
    tp: TensorParallel | None
    dp: DataParallel | None
    ema: Any
    step: int
    n_global: int
    global_sae_cfg: SAEConfig
    cfg: Any

    def snapshot(self) -> TrainerSnapshot: ...

    def snapshot_info(self) -> dict[str, Any]: ...

    def eval_weights(self) -> dict[str, torch.Tensor]: ...

    def load_snapshot(self, snap: TrainerSnapshot) -> int: ...

    def agree(self, has_batch: bool, error: Exception | None) -> bool: ...


def shard_name(tp_rank: int, tp: int) -> str:
    return f"tp{tp_rank:05d}-of-{tp:05d}"


def step_dir(step: int) -> str:
    return f"step_{step:09d}"


def is_latent_sharded(name: str) -> bool:
    """Whether a checkpoint tensor is indexed by latent along dim 0 (else replicated).
    Parameter ids follow `Trainer.params`: 0 W_enc, 1 b_enc, 2 W_dec (sharded), 3 b_pre."""
    if name in ("W_enc", "b_enc", "W_dec", "dead.tokens_since_fired"):
        return True
    if name.startswith("adam."):
        _, pid, key = name.split(".", 2)
        return int(pid) < 3 and key != "step"
    if name.startswith("ema."):
        return int(name.split(".", 1)[1]) < 3
    return False


def _coords(trainer: Trainer) -> tuple[int, int, int, int]:
    """(dp_rank, dp, tp_rank, tp) of this trainer's rank."""
    tp_rank, tp = (trainer.tp.rank, trainer.tp.size) if trainer.tp is not None else (0, 1)
    dp_rank, dp = (trainer.dp.rank, trainer.dp.size) if trainer.dp is not None else (0, 1)
    return dp_rank, dp, tp_rank, tp


def _is_rank0(trainer: Trainer) -> bool:
    dp_rank, _, tp_rank, _ = _coords(trainer)
    return dp_rank == 0 and tp_rank == 0


# ------------------------------------------------------------------------------------ write
@dataclass
class RankFiles:
    """This rank's checkpoint files as host-memory copies (file name -> tensors), plus meta.json's
    content on global rank 0: taken at a step boundary, so the files can be written while
    training goes on (the trainer updates its tensors in place)."""

    files: dict[str, dict[str, torch.Tensor]]
    meta: dict[str, Any] | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for tensors in self.files.values() for t in tensors.values())


def copy_aside(trainer: Trainer, extra: dict[str, Any] | None = None, copy: bool = True) -> RankFiles:
    """This rank's files (none on DP replicas other than 0: they hold the same weights) and, on
    global rank 0, the meta, copied into host memory (`copy=False`: views where the tensors
    already are on the host, for a write that finishes before training goes on)."""

    def host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=copy).contiguous() for k, v in tensors.items()}

    dp_rank, _, tp_rank, tp = _coords(trainer)
    files: dict[str, dict[str, torch.Tensor]] = {}
    if dp_rank == 0:
        base = shard_name(tp_rank, tp)
        files[base + ".sae.safetensors"] = host(sae_tensors(trainer.sae))
        files[base + ".state.safetensors"] = host(trainer.snapshot().tensors)
        if trainer.ema is not None:  # the weights to export: bias-corrected EMA (all per-row ops)
            files[base + ".eval.safetensors"] = host(sae_tensors(trainer.sae, trainer.eval_weights()))
    return RankFiles(files, meta_of(trainer, extra) if _is_rank0(trainer) else None)


def meta_of(trainer: Trainer, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    _, dp, _, tp = _coords(trainer)
    return {
        "format": CHECKPOINT_FORMAT,
        "dp": dp,
        "tp": tp,
        "sae_cfg_global": trainer.global_sae_cfg.to_dict(),
        "trainer": trainer.snapshot_info(),
        **(extra or {}),
    }


def write_files(
    folder: str, files: dict[str, dict[str, torch.Tensor]], storage_options: dict[str, Any] | None = None
) -> None:
    """Each file of a `RankFiles` into the checkpoint folder at `folder` (any URL or local path)."""
    for name, tensors in files.items():
        storage.write_file_atomic(storage.join(folder, name), lambda p, t=tensors: save_file(t, p), storage_options)


def write_rank_files(folder: str, trainer: Trainer, storage_options: dict[str, Any] | None = None) -> None:
    """Write this rank's shard files into the checkpoint folder at `folder` (any URL or local
    path). Only DP replica 0 writes: the other replicas hold the same weights."""
    write_files(folder, copy_aside(trainer, copy=False).files, storage_options)


def write_meta(
    folder: str, trainer: Trainer, extra: dict[str, Any] | None = None, storage_options: dict[str, Any] | None = None
) -> None:
    """Write meta.json (global rank 0 only), after every rank's files: it completes the folder."""
    if _is_rank0(trainer):
        storage.write_json_atomic(storage.join(folder, META), meta_of(trainer, extra), storage_options)


# ------------------------------------------------------------------------------------- read
def read_meta(fetch: Fetch) -> dict[str, Any]:
    try:
        path = fetch(META)
    except (FileNotFoundError, storage.StorageError) as exc:
        if retry.storage_outage(exc):
            raise  # storage did not answer: the checkpoint is not to blame
        raise CheckpointError(f"no {META}: not a complete saescale checkpoint ({exc})") from exc
    with open(path) as handle:
        meta = json.load(handle)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}: "
            "it was written by another saescale version; start a new run"
        )
    return meta


def read_rows(fetch: Fetch, kind: str, src_tp: int, n_global: int, lo: int, hi: int) -> dict[str, torch.Tensor]:
    """Rows [lo, hi) of every latent-indexed tensor of one file kind ("sae", "state", "eval"),
    read from the source shards that overlap them; replicated tensors from the first of those."""
    per_src = n_global // src_tp
    first, last = lo // per_src, (hi - 1) // per_src
    pieces: dict[str, list[torch.Tensor]] = {}
    for j in range(first, last + 1):
        start, stop = max(lo, j * per_src) - j * per_src, min(hi, (j + 1) * per_src) - j * per_src
        with safe_open(fetch(f"{shard_name(j, src_tp)}.{kind}.safetensors"), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not mappings
                if is_latent_sharded(key):
                    pieces.setdefault(key, []).append(handle.get_slice(key)[start:stop])
                elif j == first:
                    pieces[key] = [handle.get_tensor(key)]
    return {k: torch.cat(v) if len(v) > 1 else v[0] for k, v in pieces.items()}


def check_resumable(meta: dict[str, Any], trainer: Trainer) -> None:
    """Refuse a checkpoint written under another SAE or training config (e.g. another lr in a
    sweep): continuing it would mix two runs. Logging and checkpoint intervals may change."""
    ours = trainer.global_sae_cfg.to_dict()
    theirs = meta["sae_cfg_global"]
    diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    saved_train = meta["trainer"]["train_cfg"]
    ours_train = trainer.cfg.to_dict()
    diff += sorted(
        f"train.{k}"
        for k in set(ours_train) | set(saved_train)
        if k not in RESUMABLE_TRAIN_KEYS and ours_train.get(k) != saved_train.get(k)
    )
    if diff:
        raise CheckpointError(
            f"the checkpoint was written under another config (differs in {', '.join(diff)}); "
            "resume with the same settings or start a new run (another run name / output dir)"
        )
    # the lr: a checkpoint from before train.lr_rule took the paper's rule; under the budget rule
    # the default lr follows the run's length, so a longer max_steps would change it mid-run
    theirs_cfg = TrainConfig.from_dict({"lr_rule": "paper"} | saved_train)
    theirs_lr, ours_lr = theirs_cfg.resolved_lr(trainer.n_global), trainer.cfg.resolved_lr(trainer.n_global)
    if not math.isclose(theirs_lr, ours_lr, rel_tol=1e-9):
        raise CheckpointError(
            f"the checkpoint trained at lr {theirs_lr:.4g} and this run would continue at {ours_lr:.4g} "
            f"(train.lr_rule={trainer.cfg.lr_rule} sets the default lr from the run's token budget, which changed); "
            f"pass train.lr={theirs_lr:.6g} to continue it, or start a new run"
        )


def load_rank_shard(fetch: Fetch, trainer: Trainer) -> dict[str, Any]:
    """Load this rank's slice (weights, Adam, counters, EMA, RNG) into `trainer`, resharding from
    whatever tp the checkpoint was written at; returns its meta."""
    meta = read_meta(fetch)
    check_resumable(meta, trainer)
    _, _, tp_rank, tp = _coords(trainer)
    n = trainer.n_global
    lo, hi = tp_rank * n // tp, (tp_rank + 1) * n // tp
    load_sae_tensors(trainer.sae, read_rows(fetch, "sae", meta["tp"], n, lo, hi))
    state = read_rows(fetch, "state", meta["tp"], n, lo, hi)
    trainer.load_snapshot(TrainerSnapshot(tensors=state, info=meta["trainer"]))
    return meta


def url_fetcher(folder: str, local_dir: str, storage_options: dict[str, Any] | None = None) -> Fetch:
    """A Fetch for a checkpoint folder at any URL: local files are used in place, remote ones
    are downloaded into `local_dir` once."""

    def fetch(name: str) -> str:
        return storage.local_copy(storage.join(folder, name), os.path.join(local_dir, name), storage_options)

    return fetch


# -------------------------------------------------------------- checkpoints on any fsspec URL
class StorageCheckpointer:
    """Checkpoints of one run under `root` (local path or URL): `step_<n>/` folders plus
    `latest.json`, written only once the folder is complete, so a crash mid-save leaves the
    previous checkpoint as the latest. Works for one process and for a (dp x tp) group."""

    def __init__(
        self,
        root: str,
        storage_options: dict[str, Any] | None = None,
        keep_last: int | None = KEEP_LAST,
        extra: Callable[[Trainer], dict[str, Any]] | None = None,
    ) -> None:
        self.root, self.storage_options, self.keep_last, self.extra = root, storage_options, keep_last, extra

    def save(self, trainer: Trainer, final: bool = False) -> str:
        folder = storage.join(self.root, step_dir(trainer.step))
        try:
            write_rank_files(folder, trainer, self.storage_options)
            error = None
        except Exception as exc:  # noqa: BLE001 - one rank's failed write must stop every rank
            error = exc
        # every rank's files exist before rank 0 completes the folder (raises on all ranks if not)
        trainer.agree(True, error)
        write_meta(folder, trainer, self.extra(trainer) if self.extra else None, self.storage_options)
        if _is_rank0(trainer):
            previous = latest_step(self.root, self.storage_options)
            storage.write_json_atomic(
                storage.join(self.root, LATEST),
                {"step": trainer.step, "dir": step_dir(trainer.step)},
                self.storage_options,
            )
            if self.keep_last is not None:
                self._prune(protect={trainer.step, previous} - {None})
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()  # nobody moves on (or exits) before the checkpoint is registered
        return folder

    def restore(self, trainer: Trainer, step: int | None = None) -> int:
        """Load the latest (or a given) checkpoint into `trainer`; returns its step (0 if none)."""
        step = latest_step(self.root, self.storage_options) if step is None else step
        if step is None:
            return 0
        with tempfile.TemporaryDirectory(prefix="saescale-resume-") as tmp:
            load_rank_shard(url_fetcher(storage.join(self.root, step_dir(step)), tmp, self.storage_options), trainer)
        return trainer.step

    def _prune(self, protect: set[int]) -> None:
        fs, path = storage.url_to_fs(self.root, self.storage_options)
        try:
            entries = [os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
        except FileNotFoundError:
            return
        steps = sorted(int(e[5:]) for e in entries if e.startswith("step_") and e[5:].isdigit())
        for s in steps[: -self.keep_last] if self.keep_last else steps:
            if s not in protect:
                storage.remove_tree(storage.join(self.root, step_dir(s)), self.storage_options)


def latest_step(root: str, storage_options: dict[str, Any] | None = None) -> int | None:
    url = storage.join(root, LATEST)
    if not storage.exists(url, storage_options):
        return None
    return int(storage.read_json(url, storage_options)["step"])


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
    checkpoint_url: str,
    out_url: str,
    metadata: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write the full SAE (a folder `load_sae` reads) from a checkpoint folder, one tensor of
    one shard in memory at a time: the safetensors file is streamed shard by shard in rank
    order, which is exactly the full matrices' row order. Remote shards are fetched once per
    large tensor, so local disk holds the output plus one shard, never the whole checkpoint."""
    meta = json.loads(storage.read_bytes(storage.join(checkpoint_url, META), storage_options))
    cfg = SAEConfig.from_dict(meta["sae_cfg_global"])
    tp, n, d = meta["tp"], cfg.n_latents, cfg.d_in
    kind = (
        "eval"
        if storage.exists(storage.join(checkpoint_url, f"{shard_name(0, tp)}.eval.safetensors"), storage_options)
        else "sae"
    )  # the EMA weights when the run kept them
    entries = [
        ("W_enc", "F32", [n, d]),
        ("b_enc", "F32", [n]),
        ("W_dec", "F32", [n, d]),
        ("b_pre", "F32", [d]),
        ("input_scale", "F32", []),
    ]
    if activation(cfg.architecture).has_threshold:  # BatchTopK's threshold, replicated on every rank
        entries.append(("threshold", "F32", []))
    with tempfile.TemporaryDirectory(prefix="saescale-export-") as tmp:
        out_path = os.path.join(tmp, WEIGHTS_FILE)
        with open(out_path, "wb") as out:
            out.write(_header(entries, {"format": FORMAT}))
            for name, _, _ in entries:
                for rank in range(tp if is_latent_sharded(name) else 1):
                    # one shard file on local disk and one of its tensors in memory at a time
                    url = storage.join(checkpoint_url, f"{shard_name(rank, tp)}.{kind}.safetensors")
                    path = storage.local_copy(url, os.path.join(tmp, "shard.safetensors"), storage_options)
                    with safe_open(path, framework="pt") as handle:
                        out.write(handle.get_tensor(name).contiguous().float().numpy().tobytes())
                    if path.startswith(tmp):
                        os.remove(path)
        storage.write_file_atomic(
            storage.join(out_url, WEIGHTS_FILE), lambda p: shutil.move(out_path, p), storage_options
        )
    body = {"format": FORMAT, "sae": cfg.to_dict(), "metadata": metadata or {}}
    storage.write_json_atomic(storage.join(out_url, CONFIG_FILE), body, storage_options)
    return out_url
