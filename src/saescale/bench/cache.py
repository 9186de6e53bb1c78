"""`saescale bench cache`: activation-cache writer tokens/s (the default model, end to end) and
reader rows/s into torch tensors, from local disk and from an S3-compatible server.

The reader is measured on a synthetic cache of the requested size (random float16 rows written
in the real shard format), so it needs no model; the S3 figure uses moto's server on loopback
(started here) unless --s3-endpoint points at a real one. Prints one JSON object.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import pyarrow as pa
import torch

from saescale import storage
from saescale.data.format import activation_array, sha256, table_bytes
from saescale.data.manifest import MANIFEST, Manifest, ShardInfo
from saescale.data.reader import ActivationCache
from saescale.net import free_port


def write_synthetic_cache(
    url: str, d_model: int, shards: int, rows_per_shard: int, storage_options: dict[str, Any] | None = None
) -> None:
    g = torch.Generator().manual_seed(0)
    infos = []
    for s in range(shards):
        acts = torch.randn(rows_per_shard, d_model, generator=g).to(torch.float16)
        zeros = pa.array([0] * rows_per_shard, pa.int32())
        table = pa.table(
            {
                "act": activation_array(acts),
                "token_id": zeros,
                "doc": zeros,
                "window": zeros,
                "pos": pa.array([0] * rows_per_shard, pa.int16()),
            }
        )
        data = table_bytes(table)
        name = f"shards/shard-{s:05d}.parquet"
        storage.write_bytes_atomic(storage.join(url, name), data, storage_options)
        infos.append(ShardInfo(name, rows_per_shard, sha256(data), len(data)))
    manifest = Manifest(
        model="synthetic",
        tokenizer="none",
        hook="none",
        layer=0,
        d_model=d_model,
        dtype="float16",
        context_length=64,
        seed=0,
        corpus="none",
        n_rows=shards * rows_per_shard,
        rows_per_shard=rows_per_shard,
        shards=infos,
        windows_file="",
        documents=[],
        stats={},
        build_config={},
    )
    storage.write_json_atomic(storage.join(url, MANIFEST), manifest.to_dict(), storage_options)


def measure_reader(url: str, batch_size: int, storage_options: dict[str, Any] | None = None) -> dict[str, float]:
    cache = ActivationCache(url, storage_options)
    t0 = time.perf_counter()
    rows = 0
    for batch in cache.iter_batches(batch_size, dtype=torch.float16):
        rows += batch.shape[0]
    seconds = time.perf_counter() - t0
    return {
        "rows": rows,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds, 1),
        "mib_per_s": round(rows * cache.d_model * 2 / seconds / 2**20, 1),
    }


def bench_cache(
    d_model: int = 576,
    shards: int = 8,
    rows_per_shard: int = 16384,
    batch_size: int = 4096,
    writer_tokens: int = 4096,
    s3_endpoint: str | None = None,
    skip_writer: bool = False,
) -> dict[str, Any]:
    torch.set_num_threads(2)
    result: dict[str, Any] = {
        "bench": "cache",
        "d_model": d_model,
        "dtype": "float16",
        "rows": shards * rows_per_shard,
        "batch_size": batch_size,
    }
    with tempfile.TemporaryDirectory(prefix="saescale-bench-cache-") as tmp:
        local = os.path.join(tmp, "synthetic")
        write_synthetic_cache(local, d_model, shards, rows_per_shard)
        result["reader_local"] = measure_reader(local, batch_size)

        server = None
        if s3_endpoint is None:
            from moto.server import ThreadedMotoServer

            port = free_port()
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            server.start()
            s3_endpoint = f"http://127.0.0.1:{port}"
            for key, value in (
                ("AWS_ACCESS_KEY_ID", "bench"),
                ("AWS_SECRET_ACCESS_KEY", "bench"),
                ("AWS_DEFAULT_REGION", "us-east-1"),
            ):
                os.environ.setdefault(key, value)
        try:
            import s3fs

            options = {**storage.endpoint_options(s3_endpoint), "skip_instance_cache": True}
            s3fs.S3FileSystem(**options).mkdir("saescale-bench")
            write_synthetic_cache("s3://saescale-bench/synthetic", d_model, shards, rows_per_shard, options)
            result["reader_s3"] = measure_reader("s3://saescale-bench/synthetic", batch_size, options)
            result["s3_server"] = "moto (loopback)" if server else "given endpoint"
        finally:
            if server is not None:
                server.stop()

        if not skip_writer:
            from saescale.data.builder import CacheConfig, build_cache
            from saescale.lm.embedded import EMBEDDED_CORPUS, EMBEDDED_MODEL
            from saescale.lm.models import load_causal_lm

            load_causal_lm(EMBEDDED_MODEL)  # convert/load once outside the timing
            cfg = CacheConfig(
                model=EMBEDDED_MODEL,
                corpus=EMBEDDED_CORPUS,
                output=os.path.join(tmp, "smol"),
                max_tokens=writer_tokens,
                rows_per_shard=max(1024, writer_tokens // 4),
                use_ray=False,
            )
            t0 = time.perf_counter()
            manifest = build_cache(cfg, progress=lambda s: None)
            seconds = time.perf_counter() - t0
            result["writer"] = {
                "model": EMBEDDED_MODEL,
                "hook": f"{cfg.hook}.{cfg.layer}",
                "tokens": manifest.n_rows,
                "seconds": round(seconds, 2),
                "tokens_per_s": round(manifest.n_rows / seconds, 1),
            }
    return result
