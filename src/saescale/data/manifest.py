"""The cache manifest (`manifest.json`, written last): what produced the cache and what is in it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

FORMAT = "saescale.activation-cache.v1"
MANIFEST = "manifest.json"


@dataclass
class ShardInfo:
    file: str  # relative to the cache root
    rows: int
    sha256: str
    bytes: int


@dataclass
class Manifest:
    model: str
    tokenizer: str
    hook: str
    layer: int
    d_model: int
    dtype: str
    context_length: int
    seed: int
    corpus: str
    n_rows: int
    rows_per_shard: int
    shards: list[ShardInfo]
    windows_file: str  # Parquet table: window, doc, start, token_ids (to show contexts)
    documents: list[str]  # document names, indexed by the windows table's `doc`
    stats: dict[str, Any]  # mean [d_model], mean_sq_norm, computed over all rows in float64
    build_config: dict[str, Any] = field(default_factory=dict)  # what a rerun must match to resume
    format: str = FORMAT

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a saescale activation cache manifest (format {data.get('format')!r})")
        data = dict(data)
        data["shards"] = [ShardInfo(**s) for s in data["shards"]]
        return cls(**data)
