"""The two passes over the cache that feed the feature pages.

1. `SketchWork`: each block's `LatentSketch` (statistics, top windows, a sample of positive
   activations) of the chosen latents.
2. `ContextWork`: once the examples are known, a latent's activation at every token of each
   example's window. The cache is shuffled, so a window's rows lie in every shard: this pass
   reads the whole cache but keeps only the (window, latent) pairs asked for, so what it returns
   is O(examples x context length), whatever the cache's size.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from saescale.features.passes import Block, SAESource, encode_rows
from saescale.features.sketch import LatentSketch


@dataclass
class SketchWork:
    sae: SAESource
    latents: np.ndarray
    top: int
    sample: int
    seed: int

    def open(self) -> Callable[[Block], bytes]:
        sae = self.sae()

        def summarise(block: Block) -> bytes:
            sketch = LatentSketch(self.latents, self.top, self.sample, self.seed)
            code = encode_rows(sae, block.acts)
            sketch.update(code.values, code.indices, block.window, block.pos)
            return sketch.to_bytes()

        return summarise


def merge_sketches(parts: Iterable[bytes]) -> LatentSketch | None:
    merged = None
    for data in parts:
        sketch = LatentSketch.from_bytes(data)
        merged = sketch if merged is None else merged.merge(sketch)
    return merged


def pair_keys(windows: np.ndarray, latents: np.ndarray, n_latents: int) -> np.ndarray:
    return np.asarray(windows, np.int64) * n_latents + np.asarray(latents, np.int64)


@dataclass
class ContextWork:
    """Keeps the activations of the (window, latent) pairs in `pairs` (sorted keys
    window * n_latents + latent)."""

    sae: SAESource
    pairs: np.ndarray
    n_latents: int

    def open(self) -> Callable[[Block], bytes]:
        sae = self.sae()
        windows = np.unique(self.pairs // self.n_latents)

        def collect(block: Block) -> bytes:
            rows = np.flatnonzero(np.isin(block.window, windows))
            win, pos = block.window[rows], block.pos[rows]
            code = encode_rows(sae, block.acts[rows])
            lat = code.indices.numpy().astype(np.int64)
            val = code.values.float().numpy()
            keys = pair_keys(win[:, None], lat, self.n_latents)
            hit = np.isin(keys, self.pairs) & (val > 0)
            r, c = np.nonzero(hit)
            buf = io.BytesIO()
            np.savez(buf, win=win[r], pos=pos[r], lat=lat[r, c], val=val[r, c])
            return buf.getvalue()

        return collect


class WindowActivations:
    """The gathered activations: for each (window, latent) pair asked for, the latent's
    activation at each position of the window (0 where it does not fire, or where the cache has
    no row: tokens it dropped, such as BOS)."""

    def __init__(self, win: np.ndarray, pos: np.ndarray, lat: np.ndarray, val: np.ndarray, context_length: int) -> None:
        self.context_length = context_length
        self.dense = np.zeros((0, context_length), np.float32)
        self.row: dict[tuple[int, int], int] = {}
        if len(win):
            pairs, which = np.unique(np.stack([win, lat], axis=1), axis=0, return_inverse=True)
            self.dense = np.zeros((len(pairs), context_length), np.float32)
            self.dense[which.reshape(-1), pos] = val
            self.row = {(w, la): i for i, (w, la) in enumerate(pairs.tolist())}

    def get(self, window: int, latent: int) -> np.ndarray:
        """[context_length] activations (zeros for a pair that never fired)."""
        i = self.row.get((window, latent))
        return self.dense[i] if i is not None else np.zeros(self.context_length, np.float32)

    def sparse(self) -> dict[tuple[int, int], list[tuple[int, float]]]:
        """(window, latent) -> [(position, activation), ...] of its nonzero positions, for all
        pairs at once (one vectorised pass, not one numpy call per example)."""
        rows, cols = np.nonzero(self.dense)
        bounds = np.searchsorted(rows, np.arange(len(self.dense) + 1)).tolist()
        pos, val = cols.tolist(), self.dense[rows, cols].tolist()
        return {
            key: list(zip(pos[bounds[i] : bounds[i + 1]], val[bounds[i] : bounds[i + 1]]))
            for key, i in self.row.items()
        }


def gather_contexts(parts: Iterable[bytes], context_length: int) -> WindowActivations:
    """Merge the context pass's block results."""
    columns: dict[str, list[np.ndarray]] = {"win": [], "pos": [], "lat": [], "val": []}
    for data in parts:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            for name, values in columns.items():
                values.append(z[name])
    if not columns["win"]:
        empty = np.zeros(0, np.int64)
        return WindowActivations(empty, empty, empty, np.zeros(0, np.float32), context_length)
    win, pos, lat, val = (np.concatenate(columns[n]) for n in ("win", "pos", "lat", "val"))
    return WindowActivations(win, pos, lat, val, context_length)
