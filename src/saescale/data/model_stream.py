"""Activations computed as they are trained on (`data.source=model`): the window order and the
rows each step gets, as pure functions of the seed, so a resumed run picks up exactly where the
checkpoint left it, on any worker layout.

Windows: the cache builder's (`data.builder.make_plan`: the same corpus, windows and rows as a
cache of `max_tokens`). They are dealt, in a seeded random order, into chunks of
`windows_per_batch` windows (one LM forward each), so a chunk mixes windows from all over the
corpus. The chunks play the part a cache's shards play in `service.stream.DataPlan`: each epoch
takes them in a seeded order and cuts the rows into `streams` equal parts, stream c reading part
c of every epoch.

Blocks: a stream's rows are grouped `block_steps` steps at a time (about
`data.shuffle_buffer_rows` rows); a block is computed whole (its chunks forwarded, their rows
cut to the block) and its rows permuted by a seed of (run seed, stream, block): the shuffle
buffer, with no state that crosses a block. A rank's item is one block of each stream it owns,
laid out step by step (stream order within a step), which is its share of those steps. So a run
resumed at step s starts at the block holding s and drops the steps before s in it: no window
is computed for nothing but the block's, no row repeats or goes missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from saescale import storage
from saescale.data.blocks import block_permutation, resume_block
from saescale.data.builder import CacheConfig, Plan, WindowRows, part_marker, window_rows, write_buckets
from saescale.data.format import activation_array

CHUNK_SEED = 0x5EED  # mixed into the seed of the window -> chunk deal


def chunk_name(chunk: int) -> str:
    return f"chunk-{chunk:06d}"


def deal_chunks(n_windows: int, per_chunk: int, seed: int) -> list[list[int]]:
    """Windows 0..n-1 in a seeded random order, cut into chunks of `per_chunk` (the last may be short)."""
    order = np.random.default_rng([seed, CHUNK_SEED]).permutation(n_windows).tolist()
    return [order[i : i + per_chunk] for i in range(0, n_windows, per_chunk)]


def chunk_rows(plan: Plan, chunks: list[list[int]]) -> list[int]:
    """The rows of each chunk (its windows' kept positions)."""
    return [int(plan.keep[chunk].sum()) for chunk in chunks]


@dataclass
class ModelStream:
    """A model-streamed run's data: the plan's windows in chunks, the run's
    `service.stream.DataPlan` over them (files = chunk names, file_rows = the rows of each
    chunk, its seed the run's), and `block_steps` steps of every stream computed at a time."""

    plan: Plan
    chunks: list[list[int]]
    data: Any  # the `service.stream.DataPlan` over the chunks (a layer above: not imported here)
    block_steps: int
    _pieces: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict, repr=False, compare=False)

    def stream_pieces(self, stream: int) -> list[tuple[int, int, int]]:
        """(chunk, start, stop) rows of every epoch's read of `stream`, in the stream's order."""
        if stream not in self._pieces:
            reads = self.data.stream_reads(stream)
            self._pieces[stream] = [(int(p.path.rsplit("-", 1)[1]), p.start, p.stop) for read in reads for p in read]
        return self._pieces[stream]

    def blocks(self, total_steps: int) -> int:
        return -(-total_steps // self.block_steps)

    def block_steps_of(self, block: int) -> range:
        return range(block * self.block_steps, min((block + 1) * self.block_steps, self.data.total_steps))

    def items(self, total_steps: int, start_step: int) -> list[dict[str, int]]:
        """A rank's work from `start_step` to `total_steps`: one item per block, the first
        without the steps already trained."""
        first, skip = resume_block(start_step, self.block_steps)
        return [{"block": b, "skip": skip if b == first else 0} for b in range(first, self.blocks(total_steps))]


def slice_pieces(pieces: list[tuple[int, int, int]], lo: int, hi: int) -> list[tuple[int, int, int]]:
    """The parts of `pieces` (rows laid end to end) that fall in rows [lo, hi) of the stream."""
    out, offset = [], 0
    for chunk, start, stop in pieces:
        n = stop - start
        a, b = max(lo - offset, 0), min(hi - offset, n)
        if a < b:
            out.append((chunk, start + a, start + b))
        offset += n
        if offset >= hi:
            break
    return out


def block_rows(
    model,
    cfg: CacheConfig,
    ms: ModelStream,
    stream: int,
    block: int,
    write: CacheConfig | None = None,
    got: dict[int, WindowRows] | None = None,
) -> WindowRows:
    """The rows of one stream's block, shuffled (seed: run seed, stream, block). With `write`
    (a write-through cache), each chunk computed here also lands in that cache's buckets. `got`:
    chunks already computed (a chunk that straddles two blocks is forwarded once), and where the
    ones computed here go."""
    steps = ms.block_steps_of(block)
    lo, hi = steps.start * ms.data.stream_batch, steps.stop * ms.data.stream_batch
    got = {} if got is None else got
    parts = []
    for chunk, start, stop in slice_pieces(ms.stream_pieces(stream), lo, hi):
        if chunk not in got:
            got[chunk] = window_rows(model, cfg, ms.plan, ms.chunks[chunk], f"chunk {chunk}")
            if write is not None and not storage.exists(part_marker(write, chunk), write.storage_options):
                write_buckets(write, ms.plan, chunk, got[chunk])
        parts.append(take(got[chunk], np.arange(start, stop)))
    rows = concat(parts)
    if len(rows.rows) != hi - lo:
        raise RuntimeError(f"internal: stream {stream} block {block} has {len(rows.rows)} rows, not {hi - lo}")
    return take(rows, block_permutation(ms.data.seed, stream, block, hi - lo))


def take(rows: WindowRows, index: np.ndarray) -> WindowRows:
    return WindowRows(
        rows.acts[torch.from_numpy(index)],
        rows.tokens[index],
        rows.windows[index],
        rows.positions[index],
        rows.rows[index],
    )


def concat(parts: list[WindowRows]) -> WindowRows:
    return WindowRows(
        torch.cat([p.acts for p in parts]),
        np.concatenate([p.tokens for p in parts]),
        np.concatenate([p.windows for p in parts]),
        np.concatenate([p.positions for p in parts]),
        np.concatenate([p.rows for p in parts]),
    )


def rank_block(
    model,
    cfg: CacheConfig,
    ms: ModelStream,
    streams: range,
    block: int,
    skip: int,
    write: CacheConfig | None = None,
    memo: dict[int, WindowRows] | None = None,
) -> pa.Table:
    """A rank's share of a block's steps (from step `skip` of the block on): for each step, the
    next `stream_batch` rows of each stream it owns, in stream order. Columns as a cache shard's
    (act in the cache dtype, window, pos), so the cached path's collate reads it. `memo` (an
    actor's, across its calls) keeps the chunks of the last block: the next block of a stream
    starts in the chunk where this one ended."""
    got = dict(memo or {})
    per_stream = [block_rows(model, cfg, ms, c, block, write, got) for c in streams]
    steps, sb = ms.block_steps_of(block), ms.data.stream_batch
    if memo is not None:
        ends = [slice_pieces(ms.stream_pieces(c), 0, steps.stop * sb)[-1][0] for c in streams]
        memo.clear()
        memo.update({chunk: got[chunk] for chunk in ends})
    n_steps = len(steps)
    order = [take(p, np.arange(t * sb, (t + 1) * sb)) for t in range(skip, n_steps) for p in per_stream]
    rows = concat(order)
    return pa.table(
        {
            "act": activation_array(rows.acts),
            "window": pa.array(rows.windows.astype(np.int32)),
            "pos": pa.array(rows.positions.astype(np.int16)),
        }
    )


def write_through_identity(cfg: CacheConfig, deal_seed: int) -> dict:
    """What an unfinished write-through records: the cache's identity, and that its parts are
    the stream's chunks, dealt with this seed and size (a part's marker names a chunk: a run
    that deals other chunks, or a `jobs/cache.py` resume, whose parts are ranges of windows,
    must not mix its part files with these)."""
    return {
        **cfg.identity(),
        "parts": "model-stream chunks",
        "deal_seed": deal_seed,
        "windows_per_chunk": cfg.windows_per_batch,
    }


def start_write_through(cfg: CacheConfig, deal_seed: int) -> bool:
    """Check `data.cache_write` before the run: False when it already holds this cache (nothing
    to write); an error naming the problem when it holds another or is not writable."""
    from saescale.data.builder import CacheError, build_identity_url, check_writable, load_manifest
    from saescale.data.manifest import MANIFEST

    where = storage.redact(cfg.output)
    try:
        finished = storage.exists(storage.join(cfg.output, MANIFEST), cfg.storage_options)
    except storage.StorageError as exc:
        raise CacheError(f"data.cache_write: cannot access {where}: {exc}") from exc
    if finished:
        if load_manifest(cfg.output, cfg.storage_options).build_config != cfg.identity():
            raise CacheError(f"data.cache_write: {where} already holds a cache built with other settings")
        return False
    check_writable(cfg)
    url = build_identity_url(cfg)
    if storage.exists(url, cfg.storage_options):
        if storage.read_json(url, cfg.storage_options) != write_through_identity(cfg, deal_seed):
            raise CacheError(
                f"data.cache_write: an unfinished build with other settings (or another train.seed) is in "
                f"{where}/_work; write to another URL, or delete it"
            )
    else:
        storage.write_json_atomic(url, write_through_identity(cfg, deal_seed), cfg.storage_options)
    return True


def finish_write_through(model, cfg: CacheConfig, ms: ModelStream, d_model: int, progress=print):
    """Compute the chunks the run did not (the rows no step took), then publish the cache: the
    same shards, byte for byte, that `jobs/cache.py` builds with these settings."""
    from saescale.data.builder import publish_cache

    todo = [c for c in range(len(ms.chunks)) if not storage.exists(part_marker(cfg, c), cfg.storage_options)]
    if todo:
        progress(f"write-through: computing the {len(todo)} chunk(s) no step read")
    for chunk in todo:
        write_buckets(cfg, ms.plan, chunk, window_rows(model, cfg, ms.plan, ms.chunks[chunk], f"chunk {chunk}"))
    return publish_cache(cfg, ms.plan, d_model, progress)
