"""Read an activation cache: checksummed shards -> float tensors, streamed in shuffled order.

Plain pyarrow (no Ray): the trainer's data source on one machine, and what the Ray Data
pipeline's workers do per shard. Shards are globally shuffled at build time, so reading them in a
seeded random order and slicing consecutive batches gives i.i.d.-like batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from saescale import storage
from saescale.data.builder import load_manifest
from saescale.data.format import activations_from_column, table_from_bytes
from saescale.data.manifest import Manifest


class ActivationCache:
    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.storage_options = storage_options
        self.manifest: Manifest = load_manifest(url, storage_options)

    @property
    def d_model(self) -> int:
        return self.manifest.d_model

    def read_table(self, shard: int) -> pa.Table:
        info = self.manifest.shards[shard]
        data = storage.read_bytes(storage.join(self.url, info.file), self.storage_options)
        table = table_from_bytes(data, info.sha256, info.file)
        if table.num_rows != info.rows:
            raise storage.StorageError(f"{info.file}: {table.num_rows} rows, manifest says {info.rows}")
        return table

    def read_shard(self, shard: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        table = self.read_table(shard)
        return activations_from_column(table.column("act"), self.manifest.dtype, self.d_model).to(dtype)

    def windows(self) -> pa.Table:
        from saescale.data.format import table_from_bytes as _read

        return _read(storage.read_bytes(storage.join(self.url, self.manifest.windows_file), self.storage_options))

    def batches_per_epoch(self, batch_size: int, shards: list[int]) -> int:
        return sum(self.manifest.shards[s].rows for s in shards) // batch_size

    def iter_batches(
        self,
        batch_size: int,
        shards: list[int] | None = None,
        epochs: int = 1,
        seed: int = 0,
        start_batch: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[torch.Tensor]:
        """Consecutive [batch_size, d] batches over the shards, in a new seeded shard order each
        epoch (a partial last batch of an epoch is dropped). `start_batch` resumes mid-stream;
        shards entirely before it are not read."""
        shards = list(range(len(self.manifest.shards))) if shards is None else list(shards)
        per_epoch = self.batches_per_epoch(batch_size, shards)
        if per_epoch == 0:
            raise ValueError(f"batch_size {batch_size} is larger than the {len(shards)} shards' rows")
        for epoch in range(epochs):
            if start_batch >= (epoch + 1) * per_epoch:
                continue
            order = np.random.default_rng([seed, epoch]).permutation(shards).tolist()
            skip_rows = max(0, start_batch - epoch * per_epoch) * batch_size
            row, pending, emitted = 0, [], 0
            for s in order:
                rows = self.manifest.shards[s].rows
                if row + rows <= skip_rows:
                    row += rows
                    continue
                acts = self.read_shard(s, dtype)
                if row < skip_rows:
                    acts = acts[skip_rows - row :]
                row += rows
                pending.append(acts)
                buffered = sum(p.shape[0] for p in pending)
                if buffered < batch_size:
                    continue
                data = torch.cat(pending) if len(pending) > 1 else pending[0]
                full = data.shape[0] // batch_size * batch_size
                for i in range(0, full, batch_size):
                    if emitted + skip_rows // batch_size >= per_epoch:
                        break
                    yield data[i : i + batch_size]
                    emitted += 1
                pending = [data[full:]] if full < data.shape[0] else []
