"""Passes over an activation cache, block by block: what runs on each block (a `BlockWork`) is
separate from who runs it (a `BlockRunner`: this process, or Ray Data across a cluster, see
`service.feature_pass`). A work turns a block of rows into bytes (a mergeable summary) and the
caller merges what comes back, in whatever order it comes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch

from saescale.core.arch.base import concat_codes
from saescale.core.model import TopKCode, TopKSAE
from saescale.data.format import activations_from_column

ENCODE_ELEMENTS = 1 << 26  # rows x latents of pre-activations held at once while encoding


@dataclass
class Block:
    """Rows of the cache: activations [rows, d], and each row's window and position."""

    acts: torch.Tensor
    window: np.ndarray
    pos: np.ndarray

    @classmethod
    def from_table(cls, table: pa.Table, dtype: str, d_model: int) -> Block:
        return cls(
            activations_from_column(table.column("act"), dtype, d_model),
            table.column("window").to_numpy().astype(np.int64),
            table.column("pos").to_numpy().astype(np.int64),
        )


class SAESource(Protocol):
    """Gives the SAE where a block is processed (loaded there, or the one already in memory)."""

    def __call__(self) -> TopKSAE: ...


@dataclass
class InMemorySAE:
    sae: TopKSAE

    def __call__(self) -> TopKSAE:
        return self.sae


class BlockWork(Protocol):
    def open(self) -> Callable[[Block], bytes]:
        """Called once per process (loads what the work needs); the result runs on each block."""
        ...


class BlockRunner(Protocol):
    def run(self, work: BlockWork, shards: list[int], desc: str) -> Iterator[bytes]:
        """Each block's result, as it arrives (in any order)."""
        ...


@torch.no_grad()
def encode_rows(sae: TopKSAE, acts: torch.Tensor) -> TopKCode:
    """The SAE's sparse code of raw rows, in chunks that bound the dense pre-activations."""
    chunk = max(1, ENCODE_ELEMENTS // sae.cfg.n_latents)
    codes = [sae.encode(acts[i : i + chunk].float()) for i in range(0, acts.shape[0], chunk)]
    if not codes:
        empty = torch.zeros(0, sae.cfg.k)
        return TopKCode(empty, empty.long())
    return concat_codes(codes)  # BatchTopK's and ReLU's codes differ in width from block to block


class LocalRunner:
    """Blocks in this process: each shard, or slices of `rows_per_block` rows of it."""

    def __init__(self, cache, rows_per_block: int | None = None, progress: bool = True) -> None:
        self.cache = cache
        self.rows_per_block = rows_per_block
        self.progress = progress

    def run(self, work: BlockWork, shards: list[int], desc: str) -> Iterator[bytes]:
        from tqdm import tqdm

        fn = work.open()
        manifest = self.cache.manifest
        for s in tqdm(shards, desc=desc, unit="shard", disable=not self.progress):
            block = Block.from_table(self.cache.read_table(s), manifest.dtype, manifest.d_model)
            step = self.rows_per_block or max(block.acts.shape[0], 1)
            for i in range(0, block.acts.shape[0], step):
                yield fn(Block(block.acts[i : i + step], block.window[i : i + step], block.pos[i : i + step]))
