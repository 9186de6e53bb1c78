"""The train job's side of `data.source=model`: everything the driver settles before Ray starts
(the windows, the stream's plan, the held-out cache, the first rows for initialisation, the
write-through's target), and the write-through's end."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from saescale import storage
from saescale.app.schema import TrainJobConfig
from saescale.console import print0
from saescale.data.blocks import block_steps
from saescale.data.builder import CacheConfig, build_cache, local_part_runner, make_plan, window_rows
from saescale.data.manifest import Manifest
from saescale.data.model_stream import (
    ModelStream,
    chunk_name,
    chunk_rows,
    deal_chunks,
    finish_write_through,
    slice_pieces,
    start_write_through,
)
from saescale.data.reader import ActivationCache
from saescale.lm.corpus import CorpusError
from saescale.service.stream import DataPlan, plan_data


@dataclass
class ModelSource:
    """What a model-streamed run reads, and what it is scored on."""

    lm: CacheConfig  # the stream's settings (its output is unused)
    stream: ModelStream
    data: DataPlan
    d_model: int
    heldout: ActivationCache  # the documents after the budget, as a small cache
    init_sample: torch.Tensor  # the first training rows, for the geometric-median init
    write: CacheConfig | None  # data.cache_write, unless it already holds this cache

    def manifest(self) -> Manifest:
        """A manifest describing the stream (no shards), for what names the run's data."""
        lm = self.lm
        return Manifest(
            model=lm.model,
            tokenizer=lm.model,
            hook=lm.hook,
            layer=lm.layer,
            d_model=self.d_model,
            dtype=lm.dtype,
            context_length=lm.context_length,
            seed=lm.seed,
            corpus=lm.corpus,
            n_rows=self.stream.plan.n_rows,
            rows_per_shard=lm.rows_per_shard,
            shards=[],
            windows_file="",
            documents=self.stream.plan.documents,
            stats={},
            build_config=lm.identity(),
        )

    def describe_heldout(self) -> dict[str, Any]:
        """result.json's account of the held-out rows: which cache, which documents."""
        m = self.heldout.manifest
        return {
            "cache": storage.redact(self.heldout.url),
            "after_tokens": self.lm.max_tokens,
            "documents": list(m.documents),
            "rows": m.n_rows,  # whole windows: a little over data.heldout_tokens; heldout_tokens of them are scored
        }


def lm_config(job: TrainJobConfig, **changes: Any) -> CacheConfig:
    cfg = CacheConfig(output="", **vars(job.data.lm), use_ray=False)
    cfg = dataclasses.replace(cfg, **changes)
    cfg.validate()
    return cfg


def prepare_model_source(job: TrainJobConfig, output_dir: str, streams: int) -> ModelSource:
    """Plan the stream (tokenising the corpus once, as the cache builder does), build the held-out
    cache, compute the initialisation rows; every bad input fails here with one line."""
    from saescale.lm.hooks import hook_module
    from saescale.lm.models import load_causal_lm

    lm_cfg = lm_config(job)
    lm = load_causal_lm(lm_cfg.model, lm_cfg.model_cache_dir)
    hook_module(lm.model, lm_cfg.hook, lm_cfg.layer)  # a model without the hook: HookError, now
    d_model = lm.model.config.hidden_size
    plan = make_plan(lm_cfg, lm.tokenizer)  # an empty corpus: CorpusError
    chunks = deal_chunks(plan.n_windows, lm_cfg.windows_per_batch, job.train.seed)
    data = plan_data(
        [chunk_name(c) for c in range(len(chunks))],
        chunk_rows(plan, chunks),
        job.train.batch_size,
        streams,
        job.train.epochs,
        job.train.seed,
        sha256=[""] * len(chunks),  # computed, not read: nothing to verify
        sizes=[0] * len(chunks),
    )
    stream = ModelStream(plan, chunks, data, block_steps(data.stream_batch, job.data.shuffle_buffer_rows))
    print0(
        f"model stream: {plan.n_rows} tokens in {plan.n_windows} windows of {len(plan.documents)} documents, "
        f"{len(chunks)} chunks; {job.data.lm_actors} LM actor(s) per worker, blocks of {stream.block_steps} steps"
    )

    heldout_url = storage.absolute(job.data.heldout_cache or storage.join(output_dir, "heldout-cache"))
    heldout_cfg = lm_config(
        job, output=heldout_url, skip_tokens=lm_cfg.max_tokens, max_tokens=job.data.heldout_tokens
    )  # fmt: skip
    # the default lives beside the run's output (storage.url's endpoint), one set by hand with the data
    endpoint = job.data.endpoint_url if job.data.heldout_cache else job.storage.endpoint_url
    heldout_cfg.storage_options = storage.endpoint_options(endpoint) if storage.is_remote(heldout_url) else None
    try:
        build_cache(heldout_cfg, progress=print0, part_runner=local_part_runner(lm.model))
    except CorpusError as exc:
        if "produced no tokens" not in str(exc):
            raise
        raise CorpusError(
            f"the held-out slice is empty: {lm_cfg.corpus!r} has no document after those that the "
            f"training budget (data.lm.max_tokens={lm_cfg.max_tokens}) touches (a held-out document is one no "
            "training window comes from); lower data.lm.max_tokens, or split the corpus into more documents"
        ) from exc
    heldout = ActivationCache(heldout_url, heldout_cfg.storage_options)

    samples = min(job.train.geometric_median_samples, lm_cfg.rows_per_shard)
    pieces = slice_pieces(stream.stream_pieces(0), 0, samples)
    with torch.no_grad():
        rows = [window_rows(lm.model, lm_cfg, plan, chunks[c], f"chunk {c}").acts[a:b] for c, a, b in pieces]
    init_sample = torch.cat(rows)

    write = None
    if job.data.cache_write:
        write = lm_config(job, output=storage.absolute(job.data.cache_write))
        write.storage_options = storage.endpoint_options(job.data.endpoint_url)
        if not start_write_through(write, job.train.seed):
            print0(f"data.cache_write: {storage.redact(write.output)} already holds this cache; not writing it")
            write = None
    return ModelSource(lm_cfg, stream, data, d_model, heldout, init_sample, write)


def finish_model_source(source: ModelSource) -> None:
    """After training: the write-through's missing chunks and its publication."""
    if source.write is None:
        return
    from saescale.lm.models import load_causal_lm

    lm = load_causal_lm(source.lm.model, source.lm.model_cache_dir)
    with torch.no_grad():
        finish_write_through(lm.model, source.write, source.stream, source.d_model, progress=print0)
