"""Build an activation cache: LM forward passes -> globally shuffled Parquet shards + manifest.

Shuffle (a two-pass bucket shuffle, exact and bounded in memory): the token rows of the chosen
windows are numbered 0..N-1 in corpus order and a seeded permutation gives every row its final
place (shard = perm // rows_per_shard, slot = perm % rows_per_shard). Pass 1 runs the model
over "parts" (consecutive groups of windows) and writes each part's rows into one bucket file
per destination shard under `_work/`. Pass 2 assembles each shard from its buckets, ordered by
slot. Every shard is a uniform random sample of the whole cache in random order, so training
can read shards in any order and never sees document order.

Safety: every file is published atomically and `manifest.json` is written last, after which
`_work/` is removed. A rerun with the same config resumes and produces identical shards:
  * a part is skipped when its marker `_work/parts/part-P.done` exists (its bucket files were
    all published before the marker);
  * a shard is skipped (not re-assembled) when its record `_work/shards/shard-S.json` exists and
    the published shard file's sha256 equals the record's; the record, written right after the
    shard file, also keeps the shard's row statistics for the manifest. Any other shard (no
    record, file missing, or different bytes) is assembled again from its buckets;
  * only the part files `part-P.parquet` of a bucket folder are read: temporary files that a
    killed atomic write left behind (`.name.tmp-...`) are ignored.
"""

from __future__ import annotations

import os
import re
from array import array
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from saescale import storage
from saescale.data.format import (
    ITEMSIZES,
    activation_array,
    activations_from_column,
    sha256,
    table_bytes,
    table_from_bytes,
    torch_dtype,
)
from saescale.data.manifest import MANIFEST, Manifest, ShardInfo
from saescale.lm.activations import TokenWindow, token_windows
from saescale.lm.corpus import CorpusError, iter_documents


class CacheError(RuntimeError):
    """The cache cannot be built or read; the message names the problem."""


@dataclass
class CacheConfig:
    """What to cache: which model, corpus and hook site, how much, and where the shards go."""

    model: str  # a Hugging Face id, a local model dir, a .gguf file, or embedded:<name>
    corpus: str  # a folder/glob of .txt/.jsonl/.parquet, an HF dataset id, or embedded:<name>
    output: str  # any fsspec URL
    hook: str = "resid_post"  # resid_post | mlp_out | attn_out
    layer: int = 8
    context_length: int = 64  # the paper's context length
    max_tokens: int = 150_000
    dtype: str = "float16"  # float16 | bfloat16 | float32
    rows_per_shard: int = 16384
    drop_special_tokens: bool = True  # BOS/EOS/pad and other special tokens are not cached
    seed: int = 0
    text_field: str = "text"  # the text column of .jsonl/.parquet/HF corpora
    windows_per_batch: int = 16
    num_workers: int = 1  # model replicas in the Ray actor pool (one per GPU/node)
    use_ray: bool = True  # the cache job computes parts on a Ray actor pool (service.cache_actors)
    model_cache_dir: str | None = None  # where GGUF models are converted once (default ~/.cache/saescale)
    # start after this many rows, at the next document: a held-out slice that a cache (or a
    # model-streamed run) of max_tokens=skip_tokens with the same corpus never contains
    skip_tokens: int = 0
    storage_options: dict[str, Any] | None = field(default=None, repr=False)

    def identity(self) -> dict[str, Any]:
        """The settings that determine the cache's content (a resume must match them)."""
        keys = (
            "model",
            "corpus",
            "hook",
            "layer",
            "context_length",
            "max_tokens",
            "dtype",
            "rows_per_shard",
            "drop_special_tokens",
            "seed",
            "text_field",
        )
        out = {k: getattr(self, k) for k in keys}
        if self.skip_tokens:  # absent at 0: caches built before the key existed keep their identity
            out["skip_tokens"] = self.skip_tokens
        return out

    def validate(self) -> None:
        if self.dtype not in ITEMSIZES:
            raise CacheError(f"dtype must be one of {sorted(ITEMSIZES)}, got {self.dtype!r}")
        for name in ("context_length", "max_tokens", "rows_per_shard", "windows_per_batch", "num_workers"):
            if getattr(self, name) <= 0:
                raise CacheError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.layer < 0:
            raise CacheError(f"layer must be >= 0, got {self.layer}")
        if self.skip_tokens < 0:
            raise CacheError(f"skip_tokens must be >= 0, got {self.skip_tokens}")


# ----------------------------------------------------------------------------- planning
@dataclass
class Plan:
    """The windows of a cache, as arrays: about 13 bytes a token (a model stream ships the plan to
    every LM actor, where Ray shares numpy arrays without copying), not ~45 as Python lists."""

    ids: np.ndarray  # [windows, context_length] int32 token ids (every window is full length)
    starts: np.ndarray  # int64 position of each window's first token in its document
    window_docs: np.ndarray  # int32 index into `documents` of each window
    documents: list[str]
    keep: np.ndarray  # [windows, context_length] bool: which positions become rows
    row_offsets: np.ndarray  # int64 first row number of each window
    n_rows: int
    parts: list[tuple[int, int]]  # [start, stop) window ranges
    perm: np.ndarray  # row -> global destination index

    @property
    def n_windows(self) -> int:
        return len(self.ids)


def planned_windows(cfg: CacheConfig, tokenizer) -> Iterator[tuple[TokenWindow, list[bool]]]:
    """The windows a cache of `cfg` holds, in corpus order, each with the positions that become
    rows: windows while fewer than max_tokens rows came before them; with skip_tokens, counted
    from the first document that no window of the first skip_tokens rows touched."""
    special = set(getattr(tokenizer, "all_special_ids", []) or []) if cfg.drop_special_tokens else set()
    skipped, rows, skipped_docs = 0, 0, set()
    try:
        for w in token_windows(tokenizer, iter_documents(cfg.corpus, cfg.text_field), cfg.context_length):
            mask = [t not in special for t in w.ids]
            if skipped < cfg.skip_tokens or w.doc_id in skipped_docs:
                skipped += sum(mask)
                skipped_docs.add(w.doc_id)
                continue
            yield w, mask
            rows += sum(mask)
            if rows >= cfg.max_tokens:
                return
    except FileNotFoundError as exc:
        raise CorpusError(f"text source not found: {cfg.corpus}") from exc


def make_plan(cfg: CacheConfig, tokenizer) -> Plan:
    ids, keep = array("i"), array("b")  # flat: no Python object per token while the corpus is read
    starts, docs, documents = array("q"), array("i"), []
    doc_index: dict[str, int] = {}
    for w, mask in planned_windows(cfg, tokenizer):
        if w.doc_id not in doc_index:
            doc_index[w.doc_id] = len(documents)
            documents.append(w.doc_id)
        ids.extend(w.ids)
        keep.extend(mask)
        starts.append(w.start)
        docs.append(doc_index[w.doc_id])
    width = cfg.context_length
    keep_np = np.frombuffer(keep, dtype=np.int8).astype(bool).reshape(-1, width)
    per_window = keep_np.sum(1)
    n_rows = int(per_window.sum())
    if n_rows == 0:
        after = f" after its first {cfg.skip_tokens} tokens" if cfg.skip_tokens else ""
        raise CorpusError(f"the corpus {cfg.corpus!r} produced no tokens{after} (empty, or shorter than one window)")
    offsets = np.concatenate([[0], np.cumsum(per_window)[:-1]]).astype(np.int64)
    rows_per_part = max(cfg.rows_per_shard, cfg.context_length)
    parts, start, acc = [], 0, 0
    for i, rows in enumerate(per_window.tolist()):
        acc += rows
        if acc >= rows_per_part:
            parts.append((start, i + 1))
            start, acc = i + 1, 0
    if start < len(per_window):
        parts.append((start, len(per_window)))
    perm = np.random.default_rng(cfg.seed).permutation(n_rows)
    if n_rows < 2**31:  # half the bytes; the same destinations
        perm = perm.astype(np.int32)
    return Plan(
        np.frombuffer(ids, dtype=np.int32).reshape(-1, width),
        np.frombuffer(starts, dtype=np.int64),
        np.frombuffer(docs, dtype=np.int32),
        documents,
        keep_np,
        offsets,
        n_rows,
        parts,
        perm,
    )


def n_shards(plan: Plan, cfg: CacheConfig) -> int:
    return (plan.n_rows + cfg.rows_per_shard - 1) // cfg.rows_per_shard


# ------------------------------------------------------------------------- pass 1: parts
def _work(cfg: CacheConfig, *parts: str) -> str:
    return storage.join(cfg.output, "_work", *parts)


def part_marker(cfg: CacheConfig, part: int) -> str:
    return _work(cfg, "parts", f"part-{part:05d}.done")


@dataclass
class WindowRows:
    """The rows of some windows: activations (cache dtype) and where each row comes from."""

    acts: torch.Tensor  # [rows, d_model]
    tokens: np.ndarray  # token id of each row
    windows: np.ndarray  # plan window index of each row
    positions: np.ndarray  # position in its window
    rows: np.ndarray  # global row number (corpus order) of each row


def window_rows(model, cfg: CacheConfig, plan: Plan, windows: list[int], what: str) -> WindowRows:
    """Forward `windows` (plan indices, `cfg.windows_per_batch` at a time) to the hook and keep
    each window's row positions, in window order then position order; `what` names the work in a
    NaN error. The cache builder's parts and the model stream (`data.model_stream`) both use it."""
    from saescale.lm.hooks import run_to_hook

    device = next(model.parameters()).device
    acts_list, tok_list, win_list, pos_list, row_list = [], [], [], [], []
    for b in range(0, len(windows), cfg.windows_per_batch):
        idx = np.asarray(windows[b : b + cfg.windows_per_batch], dtype=np.int64)
        ids = torch.from_numpy(plan.ids[idx].astype(np.int64))
        acts = run_to_hook(model, ids.to(device), cfg.hook, cfg.layer).cpu()
        keep = plan.keep[idx]
        mask = torch.from_numpy(keep)
        acts_list.append(acts[mask].to(torch_dtype(cfg.dtype)))
        tok_list.append(ids[mask])
        win = torch.from_numpy(idx).unsqueeze(1).expand_as(ids)
        pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
        win_list.append(win[mask])
        pos_list.append(pos[mask])
        # a kept position's row: its window's first row plus the kept positions before it
        rows = plan.row_offsets[idx][:, None] + np.cumsum(keep, axis=1) - 1
        row_list.append(torch.from_numpy(rows[keep]))
    acts = torch.cat(acts_list)
    if not torch.isfinite(acts.float()).all():
        raise CacheError(f"{what}: the model produced NaN/inf activations (try dtype=float32)")
    return WindowRows(
        acts,
        torch.cat(tok_list).numpy(),
        torch.cat(win_list).numpy(),
        torch.cat(pos_list).numpy(),
        torch.cat(row_list).numpy(),
    )


def write_buckets(cfg: CacheConfig, plan: Plan, part: int, got: WindowRows) -> None:
    """Write rows into the per-shard bucket files of part `part`, then its marker (a part's rows
    may be any rows of the plan: the shards are assembled by each row's destination slot)."""
    dest = plan.perm[got.rows]
    shard = dest // cfg.rows_per_shard
    slot = (dest % cfg.rows_per_shard).astype(np.int32)
    docs = plan.window_docs[got.windows]
    for s in np.unique(shard):
        sel = np.nonzero(shard == s)[0]
        table = pa.table(
            {
                "act": activation_array(got.acts[torch.from_numpy(sel)]),
                "token_id": pa.array(got.tokens[sel].astype(np.int32)),
                "doc": pa.array(docs[sel]),
                "window": pa.array(got.windows[sel].astype(np.int32)),
                "pos": pa.array(got.positions[sel].astype(np.int16)),
                "slot": pa.array(slot[sel]),
            }
        )
        storage.write_bytes_atomic(
            _work(cfg, f"shard-{int(s):05d}", f"part-{part:05d}.parquet"), table_bytes(table), cfg.storage_options
        )
    storage.write_bytes_atomic(part_marker(cfg, part), b"done", cfg.storage_options)


def compute_part(model, cfg: CacheConfig, plan: Plan, part: int) -> int:
    """Forward the part's windows and write its rows into per-shard bucket files. Returns rows."""
    start, stop = plan.parts[part]
    got = window_rows(model, cfg, plan, list(range(start, stop)), f"part {part}")
    write_buckets(cfg, plan, part, got)
    return len(got.rows)


def part_rows(plan: Plan, part: int) -> int:
    start, stop = plan.parts[part]
    return int(plan.keep[start:stop].sum())


PartRunner = Callable[[CacheConfig, Plan, list[int], Callable[[int], None]], None]
"""Computes the given parts of a plan (each part's rows written by `compute_part`) and calls
`on_rows(rows)` as each part finishes: in this process by default, or on a Ray actor pool
(`saescale.service.cache_actors.ray_part_runner`, which `jobs/cache.py` passes with use_ray)."""


def local_part_runner(model=None) -> PartRunner:
    """Compute parts one after another in this process (with `model`, or one loaded here)."""

    def run(cfg: CacheConfig, plan: Plan, todo: list[int], on_rows: Callable[[int], None]) -> None:
        lm = model
        if lm is None:
            from saescale.lm.models import load_causal_lm

            lm = load_causal_lm(cfg.model, cfg.model_cache_dir).model
        for p in todo:
            on_rows(compute_part(lm, cfg, plan, p))

    return run


def run_parts(cfg: CacheConfig, plan: Plan, todo: list[int], runner: PartRunner) -> None:
    bar = tqdm(total=plan.n_rows, unit="tok", desc="caching activations")
    bar.update(sum(part_rows(plan, p) for p in range(len(plan.parts)) if p not in todo))
    if todo:
        runner(cfg, plan, todo, bar.update)
    bar.close()


# ------------------------------------------------------------------------ pass 2: shards
def shard_file(s: int) -> str:
    return f"shards/shard-{s:05d}.parquet"


ShardResult = tuple[ShardInfo, np.ndarray, float]  # info, per-feature row sum, sum of squared norms
_PART_FILE = re.compile(r"part-\d{5,}\.parquet")


def bucket_files(fs, path: str) -> list[str]:
    """The part files of a bucket folder, sorted; anything else (a temp file a killed write left,
    `.part-00003.parquet.tmp-<uuid>`, or a stray object) would add rows that are not the shard's."""
    return sorted(f for f in fs.ls(path, detail=False) if _PART_FILE.fullmatch(f.rstrip("/").rsplit("/", 1)[-1]))


def assemble_shard(cfg: CacheConfig, plan: Plan, s: int) -> ShardResult:
    """Concatenate a shard's buckets in slot order, publish it; returns info and row stats."""
    fs, path = storage.url_to_fs(_work(cfg, f"shard-{s:05d}"), cfg.storage_options)
    files = bucket_files(fs, path)
    tables = [table_from_bytes(fs.cat_file(f), name=f) for f in files]
    table = pa.concat_tables(tables)
    slots = table.column("slot").to_numpy()
    if len(np.unique(slots)) != len(slots):  # two writers' parts mixed: never publish that
        raise CacheError(f"shard {s}: its buckets hold a row slot twice (parts of two different builds?)")
    order = np.argsort(slots)
    table = table.take(pa.array(order)).drop_columns(["slot"])
    expected = min(cfg.rows_per_shard, plan.n_rows - s * cfg.rows_per_shard)
    if table.num_rows != expected:
        raise CacheError(f"shard {s}: assembled {table.num_rows} rows, expected {expected} (missing parts?)")
    data = table_bytes(table)
    storage.write_bytes_atomic(storage.join(cfg.output, shard_file(s)), data, cfg.storage_options)
    acts = activations_from_column(table.column("act"), cfg.dtype, _d_model(table, cfg)).double()
    return (
        ShardInfo(shard_file(s), table.num_rows, sha256(data), len(data)),
        acts.sum(0).numpy(),
        float(acts.pow(2).sum()),
    )


def shard_record(cfg: CacheConfig, s: int) -> str:
    return _work(cfg, "shards", f"shard-{s:05d}.json")


def published_shard(cfg: CacheConfig, s: int) -> ShardResult | None:
    """What an earlier run recorded for shard s, if its published file still has those bytes."""
    record_url = shard_record(cfg, s)
    if not storage.exists(record_url, cfg.storage_options):
        return None
    record = storage.read_json(record_url, cfg.storage_options)
    info = ShardInfo(**record["info"])
    file_url = storage.join(cfg.output, info.file)
    if info.file != shard_file(s) or not storage.exists(file_url, cfg.storage_options):
        return None
    if sha256(storage.read_bytes(file_url, cfg.storage_options)) != info.sha256:
        return None
    return info, np.asarray(record["row_sum"], dtype=np.float64), float(record["row_sq"])


def publish_shard(cfg: CacheConfig, plan: Plan, s: int) -> ShardResult:
    """Assemble shard s unless a previous run already published it; record it for the next resume."""
    done = published_shard(cfg, s)
    if done is not None:
        return done
    info, row_sum, row_sq = assemble_shard(cfg, plan, s)
    record = {"info": asdict(info), "row_sum": row_sum.tolist(), "row_sq": row_sq}  # floats round-trip exactly
    storage.write_json_atomic(shard_record(cfg, s), record, cfg.storage_options)
    return info, row_sum, row_sq


def _d_model(table: pa.Table, cfg: CacheConfig) -> int:
    return table.schema.field("act").type.byte_width // ITEMSIZES[cfg.dtype]


# -------------------------------------------------------------------------------- driver
def windows_table(plan: Plan) -> pa.Table:
    """window -> (document, start offset, token ids): what a viewer needs to show contexts."""
    return pa.table(
        {
            "window": pa.array(np.arange(plan.n_windows, dtype=np.int32)),
            "doc": pa.array(plan.window_docs, pa.int32()),
            "start": pa.array(plan.starts, pa.int64()),
            "token_ids": pa.ListArray.from_arrays(
                pa.array(np.arange(0, plan.ids.size + 1, plan.ids.shape[1], dtype=np.int32)),
                pa.array(plan.ids.ravel(), pa.int32()),
            ),
        }
    )


def check_writable(cfg: CacheConfig) -> None:
    """Fail early (unwritable path, unreachable store, missing credentials) with the cause."""
    probe = _work(cfg, f".probe-{os.getpid()}")
    try:
        storage.write_bytes_atomic(probe, b"ok", cfg.storage_options)
        storage.remove_tree(probe, cfg.storage_options)
    except (storage.StorageError, OSError) as exc:
        raise CacheError(f"cannot write to {storage.redact(cfg.output)}: {exc}") from exc


def load_manifest(url: str, storage_options: dict[str, Any] | None = None) -> Manifest:
    murl = storage.join(url, MANIFEST)
    if not storage.exists(murl, storage_options):
        raise CacheError(f"no {MANIFEST} at {storage.redact(url)}: not a finished activation cache")
    try:
        return Manifest.from_dict(storage.read_json(murl, storage_options))
    except (ValueError, KeyError, TypeError) as exc:  # bad JSON, another format, missing fields
        raise CacheError(f"{storage.redact(murl)} is not a readable cache manifest: {exc}") from exc


def build_identity_url(cfg: CacheConfig) -> str:
    """Where an unfinished build records what it builds (a resume must match it)."""
    return _work(cfg, "build_config.json")


def build_cache(
    cfg: CacheConfig, progress: Callable[[str], None] = print, part_runner: PartRunner | None = None
) -> Manifest:
    cfg.validate()
    try:
        finished = storage.exists(storage.join(cfg.output, MANIFEST), cfg.storage_options)
    except storage.StorageError as exc:
        raise CacheError(f"cannot access {storage.redact(cfg.output)}: {exc}") from exc
    if finished:
        manifest = load_manifest(cfg.output, cfg.storage_options)
        if manifest.build_config != cfg.identity():
            raise CacheError(
                f"{storage.redact(cfg.output)} already holds a cache built with different settings; "
                "choose another output or delete it"
            )
        progress(f"cache already complete at {storage.redact(cfg.output)} ({manifest.n_rows} rows)")
        return manifest
    from saescale.lm.hooks import hook_module
    from saescale.lm.models import load_causal_lm

    # everything that can be checked is checked before the first byte is written
    lm = load_causal_lm(cfg.model, cfg.model_cache_dir)
    hook_module(lm.model, cfg.hook, cfg.layer)
    d_model = lm.model.config.hidden_size
    plan = make_plan(cfg, lm.tokenizer)
    check_writable(cfg)
    shards = n_shards(plan, cfg)
    identity_url = build_identity_url(cfg)
    if storage.exists(identity_url, cfg.storage_options):
        if storage.read_json(identity_url, cfg.storage_options) != cfg.identity():
            raise CacheError("an interrupted build with different settings is in the way; delete its _work/ folder")
    else:
        storage.write_json_atomic(identity_url, cfg.identity(), cfg.storage_options)
    todo = [p for p in range(len(plan.parts)) if not storage.exists(part_marker(cfg, p), cfg.storage_options)]
    progress(
        f"{plan.n_rows} tokens in {plan.n_windows} windows -> {shards} shards; "
        f"{len(plan.parts) - len(todo)}/{len(plan.parts)} parts already done"
    )
    run_parts(cfg, plan, todo, part_runner or local_part_runner(lm.model))
    del lm
    return publish_cache(cfg, plan, d_model, progress)


def publish_cache(cfg: CacheConfig, plan: Plan, d_model: int, progress: Callable[[str], None] = print) -> Manifest:
    """Pass 2, once every row of the plan is in a bucket: assemble and publish the shards, the
    windows table, then the manifest (last), and remove `_work/`."""
    shards = n_shards(plan, cfg)
    infos, total_sum, total_sq = [], np.zeros(d_model), 0.0
    for s in tqdm(range(shards), desc="assembling shards", unit="shard"):
        info, row_sum, row_sq = publish_shard(cfg, plan, s)
        infos.append(info)
        total_sum += row_sum
        total_sq += row_sq
    storage.write_bytes_atomic(
        storage.join(cfg.output, "windows.parquet"), table_bytes(windows_table(plan)), cfg.storage_options
    )
    manifest = Manifest(
        model=cfg.model,
        tokenizer=cfg.model,
        hook=cfg.hook,
        layer=cfg.layer,
        d_model=d_model,
        dtype=cfg.dtype,
        context_length=cfg.context_length,
        seed=cfg.seed,
        corpus=cfg.corpus,
        n_rows=plan.n_rows,
        rows_per_shard=cfg.rows_per_shard,
        shards=infos,
        windows_file="windows.parquet",
        documents=plan.documents,
        stats={"mean": (total_sum / plan.n_rows).tolist(), "mean_sq_norm": total_sq / plan.n_rows},
        build_config=cfg.identity(),
    )
    storage.write_json_atomic(storage.join(cfg.output, MANIFEST), manifest.to_dict(), cfg.storage_options)
    storage.remove_tree(storage.join(cfg.output, "_work"), cfg.storage_options)
    progress(f"wrote {plan.n_rows} rows in {shards} shards to {storage.redact(cfg.output)}")
    return manifest
