"""The feature passes on Ray Data: the cache's shards are read and checksummed by the same
datasource as training's stream, each block goes through the work (`features.passes`) in a pool
of actors (the SAE is loaded once per actor), and the driver receives one small summary per block.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from saescale.data.manifest import Manifest
from saescale.features.passes import Block, BlockWork


class _RunWork:
    """Ray Data's callable class: opens the work once per actor, then maps block -> summary."""

    def __init__(self, work: BlockWork, dtype: str, d_model: int) -> None:
        self.fn = work.open()
        self.dtype, self.d_model = dtype, d_model

    def __call__(self, table):
        return {"out": [self.fn(Block.from_table(table, self.dtype, self.d_model))]}


@dataclass
class SavedSAE:
    """The SAE loaded from its saved folder inside each Ray actor (nothing big goes through Ray)."""

    url: str
    storage_options: dict[str, Any] | None = None

    def __call__(self):
        from saescale.formats.saved import load_sae

        return load_sae(self.url, storage_options=self.storage_options)[0]


class RayDataRunner:
    """Blocks on Ray Data: a read task per shard, `rows_per_block` rows per work call (None: a
    shard), at most `actors` actors at once."""

    def __init__(
        self,
        cache_url: str,
        manifest: Manifest,
        storage_options: dict[str, Any] | None,
        remedy: str,
        rows_per_block: int | None = None,
        actors: int = 1,
    ) -> None:
        self.cache_url, self.manifest, self.options = cache_url, manifest, storage_options
        self.remedy, self.rows_per_block, self.actors = remedy, rows_per_block, actors

    def run(self, work: BlockWork, shards: list[int], desc: str) -> Iterator[bytes]:
        import ray
        import ray.data

        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < self.actors + 1:  # the read tasks need a CPU beside the actors, or Ray Data waits forever
            raise ValueError(
                f"runner.actors={self.actors} needs {self.actors + 1} CPUs in the Ray cluster (one per actor, "
                f"one for the shard reads); it has {cpus:g}"
            )

        from saescale.service.stream import (
            ACT_COLUMN,
            ROW_ID_COLUMNS,
            Piece,
            arrow_filesystem,
            shard_checks,
            verified_dataset,
        )

        filesystem, root = arrow_filesystem(self.cache_url, self.options)
        infos = [self.manifest.shards[s] for s in shards]
        paths = [posixpath.join(root, info.file) for info in infos]
        checks = shard_checks(paths, [i.sha256 for i in infos], [i.bytes for i in infos], self.cache_url, self.remedy)
        pieces = [Piece(path, 0, info.rows) for path, info in zip(paths, infos)]
        dataset = verified_dataset(pieces, checks, [ACT_COLUMN, *ROW_ID_COLUMNS], filesystem).map_batches(
            _RunWork,
            fn_constructor_kwargs={"work": work, "dtype": self.manifest.dtype, "d_model": self.manifest.d_model},
            batch_size=self.rows_per_block,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=self.actors),
        )
        dataset.context.enable_progress_bars = False
        print(f"[saescale] {desc}: {len(shards)} shards on Ray Data ({self.actors} actor(s))", flush=True)
        for row in dataset.iter_rows():
            yield row["out"]
