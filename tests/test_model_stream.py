"""The model stream's plan (`data.model_stream`) on a real transformer (a tiny Llama with SmolLM2's
tokenizer) and the embedded Shakespeare, without Ray: which rows each step gets on any layout,
a resume from any step, exactly-once over an epoch, and the write-through cache byte for byte
against the cache builder's."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from saescale.data.builder import CacheConfig, build_cache, local_part_runner, make_plan
from saescale.data.format import POS_STRIDE
from saescale.data.model_stream import (
    ModelStream,
    chunk_name,
    chunk_rows,
    deal_chunks,
    finish_write_through,
    rank_block,
    start_write_through,
)
from saescale.lm.corpus import CorpusError
from saescale.lm.models import load_causal_lm
from saescale.service.stream import owned_streams, plan_data

STREAMS, BATCH = 4, 64


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_causal_lm(tiny_model_dir)


def lm_cfg(tiny_model_dir, **changes) -> CacheConfig:
    base = CacheConfig(model=tiny_model_dir, corpus="embedded:shakespeare", output="", layer=1, max_tokens=3000)
    return dataclasses.replace(base, rows_per_shard=512, windows_per_batch=4, **changes)


@pytest.fixture(scope="module")
def stream(lm, tiny_model_dir):
    cfg = lm_cfg(tiny_model_dir)
    plan = make_plan(cfg, lm.tokenizer)
    chunks = deal_chunks(plan.n_windows, cfg.windows_per_batch, seed=3)
    rows = chunk_rows(plan, chunks)
    n = len(chunks)
    data = plan_data([chunk_name(c) for c in range(n)], rows, BATCH, STREAMS, 2, 3, sha256=[""] * n, sizes=[0] * n)
    return cfg, ModelStream(plan, chunks, data, block_steps=16), data


def steps_of(lm, stream, world: int, start: int = 0) -> list[list[int]]:
    """Every step's global batch of row ids (window * POS_STRIDE + pos), ranks gathered in order."""
    cfg, ms, data = stream
    per_rank = []
    for rank in range(world):
        owned = owned_streams(STREAMS, world, rank)
        tables = [
            rank_block(lm.model, cfg, ms, owned, i["block"], i["skip"]) for i in ms.items(data.total_steps, start)
        ]
        ids = np.concatenate(
            [t.column("window").to_numpy().astype(np.int64) * POS_STRIDE + t.column("pos").to_numpy() for t in tables]
        )
        share = BATCH // world
        per_rank.append([ids[s * share : (s + 1) * share].tolist() for s in range(len(ids) // share)])
    return [sum((per_rank[r][s] for r in range(world)), []) for s in range(len(per_rank[0]))]


def test_a_step_gets_the_same_rows_in_the_same_order_on_any_layout(lm, stream):
    one = steps_of(lm, stream, 1)
    assert len(one) == stream[2].total_steps
    assert steps_of(lm, stream, 2) == one
    assert steps_of(lm, stream, 4) == one


def test_a_resume_at_any_step_continues_with_the_next_rows(lm, stream):
    full = steps_of(lm, stream, 2)
    for start in (1, 15, 16, len(full) - 1):  # inside a block, at a block's start, the last step
        assert steps_of(lm, stream, 2, start) == full[start:]


def test_every_row_of_the_streams_is_trained_exactly_once_and_batches_mix_many_windows(lm, stream):
    """Over the run, the rows trained are exactly the streams' rows (each epoch's, every row of
    the plan once per epoch but the cut's remainder and the last partial step): none twice, none
    missing. (A block that spans an epoch's end shuffles rows of both epochs together, as any
    shuffle buffer does, so a row's two epochs may meet within a block's steps.)"""
    from collections import Counter

    cfg, ms, data = stream
    trained = Counter(i for step in steps_of(lm, stream, 1) for i in step)
    expected: Counter[int] = Counter()
    for c in range(STREAMS):
        taken = 0
        for chunk, start, stop in ms.stream_pieces(c):
            rows = [(w, p) for w in ms.chunks[chunk] for p, k in enumerate(ms.plan.keep[w]) if k][start:stop]
            rows = rows[: data.total_steps * data.stream_batch - taken]
            taken += len(rows)
            expected.update(w * POS_STRIDE + p for w, p in rows)
    assert trained == expected
    all_rows = sum(sum(k) for k in ms.plan.keep)
    assert max(trained.values()) == data.epochs and len(trained) > all_rows - STREAMS - BATCH
    windows = {i // POS_STRIDE for i in steps_of(lm, stream, 1)[0]}
    assert len(windows) >= 8  # one step: rows of many windows (the chunk deal and the block shuffle)
    assert sorted(windows) != list(range(min(windows), min(windows) + len(windows)))  # not consecutive ones


def test_the_rows_are_the_cache_builders_activations(lm, stream, tmp_path):
    """A streamed row equals the row with the same (window, pos) in a cache of the same settings."""
    import pyarrow.parquet as pq

    from saescale.data.format import activations_from_column

    cfg, ms, data = stream
    built = dataclasses.replace(cfg, output=str(tmp_path / "cache"))
    manifest = build_cache(built, progress=lambda _: None, part_runner=local_part_runner(lm.model))
    table = pq.read_table(tmp_path / "cache" / manifest.shards[0].file)
    cached = activations_from_column(table.column("act"), cfg.dtype, 48)
    key = {
        int(w) * POS_STRIDE + int(p): i
        for i, (w, p) in enumerate(zip(table.column("window").to_pylist(), table.column("pos").to_pylist()))
    }
    got = rank_block(lm.model, cfg, ms, range(STREAMS), 0, 0)
    acts = activations_from_column(got.column("act"), cfg.dtype, 48)
    ids = got.column("window").to_numpy().astype(np.int64) * POS_STRIDE + got.column("pos").to_numpy()
    both = [(j, key[i]) for j, i in enumerate(ids.tolist()) if i in key]
    assert len(both) > 10
    assert torch.equal(acts[[j for j, _ in both]], cached[[k for _, k in both]])


def test_the_write_through_cache_is_the_cache_builders_byte_for_byte(lm, stream, tmp_path):
    cfg, ms, data = stream
    built = build_cache(
        dataclasses.replace(cfg, output=str(tmp_path / "built")),
        progress=lambda _: None,
        part_runner=local_part_runner(lm.model),
    )
    write = dataclasses.replace(cfg, output=str(tmp_path / "written"))
    assert start_write_through(write, 3)
    for item in ms.items(data.total_steps, 0)[:2]:  # the run computed a few blocks, then ended
        rank_block(lm.model, cfg, ms, range(STREAMS), item["block"], item["skip"], write)
    written = finish_write_through(lm.model, write, ms, 48, progress=lambda _: None)
    assert [(s.sha256, s.rows) for s in written.shards] == [(s.sha256, s.rows) for s in built.shards]
    assert written.build_config == built.build_config
    assert not os.path.exists(tmp_path / "written" / "_work")
    assert not start_write_through(write, 3)  # finished: nothing to write again


def test_a_write_through_refuses_a_cache_of_other_settings(lm, stream, tmp_path):
    from saescale.data.builder import CacheError

    cfg, _, _ = stream
    build_cache(
        dataclasses.replace(cfg, output=str(tmp_path / "c")),
        progress=lambda _: None,
        part_runner=local_part_runner(lm.model),
    )
    with pytest.raises(CacheError, match="other settings"):
        start_write_through(dataclasses.replace(cfg, output=str(tmp_path / "c"), layer=2), 3)
    # an unfinished write-through of chunks dealt with another seed is not mixed with this one's
    assert start_write_through(dataclasses.replace(cfg, output=str(tmp_path / "w")), 3)
    with pytest.raises(CacheError, match="another train.seed"):
        start_write_through(dataclasses.replace(cfg, output=str(tmp_path / "w")), 4)


def test_the_held_out_slice_starts_at_a_document_the_budget_never_touched(lm, tiny_model_dir):
    train = make_plan(lm_cfg(tiny_model_dir, max_tokens=40_000), lm.tokenizer)
    held = make_plan(lm_cfg(tiny_model_dir, skip_tokens=40_000, max_tokens=2000), lm.tokenizer)
    assert not set(train.documents) & set(held.documents)
    assert held.n_rows >= 2000
    identity = lm_cfg(tiny_model_dir, skip_tokens=40_000).identity()
    assert identity["skip_tokens"] == 40_000 and "skip_tokens" not in lm_cfg(tiny_model_dir).identity()


def test_a_corpus_that_tokenises_to_nothing_is_one_clear_error(lm, tiny_model_dir, tmp_path):
    (tmp_path / "short.txt").write_text("Too short for a window.")
    with pytest.raises(CorpusError, match="produced no tokens"):
        make_plan(dataclasses.replace(lm_cfg(tiny_model_dir), corpus=str(tmp_path)), lm.tokenizer)
    # a few windows, all of them skipped (a small corpus: the embedded one takes seconds to tokenise)
    (tmp_path / "long").mkdir()
    (tmp_path / "long" / "text.txt").write_text("To be, or not to be. " * 400)
    long = dataclasses.replace(lm_cfg(tiny_model_dir), corpus=str(tmp_path / "long"))
    with pytest.raises(CorpusError, match="after its first 1000000 tokens"):
        make_plan(dataclasses.replace(long, skip_tokens=10**6), lm.tokenizer)
    make_plan(long, lm.tokenizer)  # unskipped, the same corpus plans


def test_chunks_deal_every_window_once_in_a_seeded_order():
    chunks = deal_chunks(103, 8, seed=1)
    flat = [w for c in chunks for w in c]
    assert sorted(flat) == list(range(103)) and flat != sorted(flat)
    assert deal_chunks(103, 8, seed=1) == chunks != deal_chunks(103, 8, seed=2)
    assert json.dumps(chunks)  # plain ints: they travel to the actors


def test_an_actor_forwards_a_chunk_that_straddles_two_blocks_once(lm, stream, monkeypatch):
    """An actor's memo of the last block's chunks: the same rows, and no chunk forwarded twice in
    a row (without it, every chunk cut by a block boundary is forwarded by both blocks)."""
    import saescale.data.model_stream as model_stream

    cfg, ms, data = stream
    calls: list[int] = []
    real = model_stream.window_rows

    def counted(model, c, plan, windows, what):
        calls.append(int(what.split()[-1]))
        return real(model, c, plan, windows, what)

    monkeypatch.setattr(model_stream, "window_rows", counted)
    items = ms.items(data.total_steps, 0)
    plain = [rank_block(lm.model, cfg, ms, range(1), i["block"], i["skip"]) for i in items]
    without = len(calls)
    calls.clear()
    memo: dict = {}
    memoised = [rank_block(lm.model, cfg, ms, range(1), i["block"], i["skip"], memo=memo) for i in items]
    assert all(a.equals(b) for a, b in zip(plain, memoised))
    assert len(calls) < without
    assert len(calls) == len(ms.stream_pieces(0))  # each read of a chunk forwarded once
