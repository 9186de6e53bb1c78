"""A mergeable per-latent summary of an SAE's activations over a stream of cache rows.

Every part merges exactly, so one code path serves one process and a cluster: each block of rows
(a shard, or part of one) is summarised on its own and the summaries merge in any order, with any
number of blocks, into what one pass over all rows gives. Memory is O(latents x examples), never
O(tokens x latents):

- moments: tokens seen, and per latent the count and the sums of a, a^2, a^3, a^4 of its
  activation (a = 0 where it does not fire), in float64;
- a histogram of positive activations on fixed log-spaced bins (fixed, so histograms add);
- the top windows: per latent the `top` context windows with the largest activation, each with
  the position of that activation (one entry per window, so the examples are distinct contexts);
- a uniform sample of positive activations: per latent the `sample` (row, activation) pairs with
  the smallest hash of (seed, row, latent). A bottom-k sketch: the union of two blocks' samples
  keeps exactly what one pass over both would, whatever the split.

Ties are broken by row id, so the result does not depend on the order rows arrive in.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import torch

from saescale.data.format import POS_STRIDE

HIST_EDGES = np.logspace(-4, 3, 71)  # 10 bins a decade over 1e-4 .. 1e3; outside values go to the end bins
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def sample_keys(rows: np.ndarray, latents: np.ndarray, seed: int) -> np.ndarray:
    """A uniform 64-bit hash of (seed, row, latent) (splitmix64): the sample's priority."""
    with np.errstate(over="ignore"):
        x = rows.astype(np.uint64) * _GOLDEN + latents.astype(np.uint64) * _MIX1 + np.uint64(seed) * _MIX2
        x ^= x >> np.uint64(30)
        x *= _MIX1
        x ^= x >> np.uint64(27)
        x *= _MIX2
        x ^= x >> np.uint64(31)
    return x


def _group_rank(groups: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each run of equal values of a sorted array."""
    n = len(groups)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    return np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))


def top_windows(
    lat: np.ndarray, win: np.ndarray, pos: np.ndarray, val: np.ndarray, top: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per latent, the `top` windows by their largest activation (ties: smaller window, then
    smaller position), from candidate (latent, window, position, activation) entries."""
    order = np.lexsort((pos, -val, win, lat))  # by latent, window, then the window's largest first
    lat, win, pos, val = lat[order], win[order], pos[order], val[order]
    first = np.r_[True, (lat[1:] != lat[:-1]) | (win[1:] != win[:-1])] if len(lat) else np.zeros(0, bool)
    lat, win, pos, val = lat[first], win[first], pos[first], val[first]
    order = np.lexsort((pos, win, -val, lat))
    lat, win, pos, val = lat[order], win[order], pos[order], val[order]
    keep = _group_rank(lat) < top
    return lat[keep], win[keep], pos[keep], val[keep]


def bottom_keys(
    lat: np.ndarray, key: np.ndarray, row: np.ndarray, val: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per latent, the `size` entries with the smallest keys (ties: smaller row)."""
    order = np.lexsort((row, key, lat))
    lat, key, row, val = lat[order], key[order], row[order], val[order]
    keep = _group_rank(lat) < size
    return lat[keep], key[keep], row[keep], val[keep]


@dataclass
class LatentSketch:
    """The summary of the rows seen so far, for the latents in `latents` (sorted global ids)."""

    latents: np.ndarray  # int64 [m]
    top: int = 20
    sample: int = 100
    seed: int = 0
    tokens: int = 0
    fires: np.ndarray = field(default=None)  # type: ignore[assignment]  # int64 [m]
    moments: np.ndarray = field(default=None)  # type: ignore[assignment]  # float64 [m, 4]: sums of a..a^4
    hist: np.ndarray = field(default=None)  # type: ignore[assignment]  # int64 [m, bins]
    # the top windows, flat: latent (global id), window, position, activation
    top_lat: np.ndarray = field(default=None)  # type: ignore[assignment]
    top_win: np.ndarray = field(default=None)  # type: ignore[assignment]
    top_pos: np.ndarray = field(default=None)  # type: ignore[assignment]
    top_val: np.ndarray = field(default=None)  # type: ignore[assignment]
    # the sample, flat: latent, hash key, row id (window * POS_STRIDE + pos), activation
    smp_lat: np.ndarray = field(default=None)  # type: ignore[assignment]
    smp_key: np.ndarray = field(default=None)  # type: ignore[assignment]
    smp_row: np.ndarray = field(default=None)  # type: ignore[assignment]
    smp_val: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.latents = np.asarray(self.latents, dtype=np.int64)
        m = len(self.latents)
        if self.fires is None:
            self.fires = np.zeros(m, np.int64)
            self.moments = np.zeros((m, 4), np.float64)
            self.hist = np.zeros((m, len(HIST_EDGES) - 1), np.int64)
            self.top_lat, self.top_win = np.zeros(0, np.int64), np.zeros(0, np.int64)
            self.top_pos, self.top_val = np.zeros(0, np.int64), np.zeros(0, np.float32)
            self.smp_lat, self.smp_key = np.zeros(0, np.int64), np.zeros(0, np.uint64)
            self.smp_row, self.smp_val = np.zeros(0, np.int64), np.zeros(0, np.float32)

    # ------------------------------------------------------------------------- building
    def slots(self, latent_ids: np.ndarray) -> np.ndarray:
        """The position of each global latent id in `latents`, -1 for latents not tracked."""
        where = np.searchsorted(self.latents, latent_ids)
        where = np.minimum(where, max(len(self.latents) - 1, 0))
        hit = len(self.latents) > 0
        return np.where(hit & (self.latents[where] == latent_ids), where, -1) if hit else np.full_like(latent_ids, -1)

    def update(self, values: torch.Tensor, indices: torch.Tensor, windows: np.ndarray, positions: np.ndarray) -> None:
        """Add rows given as a sparse code (values, indices [rows, k]) and each row's window and
        position in its window."""
        rows = values.shape[0]
        self.tokens += rows
        v = values.detach().float().cpu().numpy().reshape(-1)
        lat = indices.detach().cpu().numpy().astype(np.int64).reshape(-1)
        row_of = np.repeat(np.arange(rows), values.shape[1])
        slot = self.slots(lat)
        keep = (v > 0) & (slot >= 0)
        v, lat, slot, row_of = v[keep], lat[keep], slot[keep], row_of[keep]
        a = v.astype(np.float64)
        m = len(self.latents)
        self.fires += np.bincount(slot, minlength=m)
        for p in range(4):
            self.moments[:, p] += np.bincount(slot, weights=a ** (p + 1), minlength=m)
        bins = np.clip(np.searchsorted(HIST_EDGES, a, side="right") - 1, 0, self.hist.shape[1] - 1)
        self.hist += np.bincount(slot * self.hist.shape[1] + bins, minlength=self.hist.size).reshape(self.hist.shape)
        win = np.asarray(windows, dtype=np.int64)[row_of]
        pos = np.asarray(positions, dtype=np.int64)[row_of]
        self._add_top(lat, win, pos, v)
        row_id = win * POS_STRIDE + pos
        self._add_sample(lat, sample_keys(row_id, lat, self.seed), row_id, v)

    def _add_top(self, lat, win, pos, val) -> None:
        self.top_lat, self.top_win, self.top_pos, self.top_val = top_windows(
            np.r_[self.top_lat, lat],
            np.r_[self.top_win, win],
            np.r_[self.top_pos, pos],
            np.r_[self.top_val, val].astype(np.float32),
            self.top,
        )

    def _add_sample(self, lat, key, row, val) -> None:
        self.smp_lat, self.smp_key, self.smp_row, self.smp_val = bottom_keys(
            np.r_[self.smp_lat, lat],
            np.r_[self.smp_key, key].astype(np.uint64),
            np.r_[self.smp_row, row],
            np.r_[self.smp_val, val].astype(np.float32),
            self.sample,
        )

    def merge(self, other: LatentSketch) -> LatentSketch:
        """Fold `other` (a summary of other rows, same latents and settings) into this one."""
        if not np.array_equal(self.latents, other.latents) or (self.top, self.sample, self.seed) != (
            other.top,
            other.sample,
            other.seed,
        ):
            raise ValueError("internal: merging sketches of different latents or settings")
        self.tokens += other.tokens
        self.fires += other.fires
        self.moments += other.moments
        self.hist += other.hist
        self._add_top(other.top_lat, other.top_win, other.top_pos, other.top_val)
        self._add_sample(other.smp_lat, other.smp_key, other.smp_row, other.smp_val)
        return self

    # --------------------------------------------------------------------- transport
    _ARRAYS = ("latents", "fires", "moments", "hist", "top_lat", "top_win", "top_pos", "top_val")
    _ARRAYS += ("smp_lat", "smp_key", "smp_row", "smp_val")

    def to_bytes(self) -> bytes:
        """An .npz (no pickle) to move a block's summary between processes."""
        buf = io.BytesIO()
        scalars = np.array([self.top, self.sample, self.seed, self.tokens], dtype=np.int64)
        np.savez(buf, scalars=scalars, **{name: getattr(self, name) for name in self._ARRAYS})
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> LatentSketch:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            top, sample, seed, tokens = (int(x) for x in z["scalars"])
            arrays = {name: z[name] for name in cls._ARRAYS}
        return cls(top=top, sample=sample, seed=seed, tokens=tokens, **arrays)

    # ---------------------------------------------------------------------- reading
    def statistics(self) -> dict[str, np.ndarray]:
        """Per tracked latent: density E[a>0], mean E[a], E[a^2], skew E[a^3]/E[a^2]^1.5 and
        kurtosis E[a^4]/E[a^2]^2 (OpenAI's viewer's definitions: moments about 0, over all
        tokens), and the largest activation seen."""
        n = max(self.tokens, 1)
        e = self.moments / n
        with np.errstate(divide="ignore", invalid="ignore"):
            skew = np.where(e[:, 1] > 0, e[:, 2] / e[:, 1] ** 1.5, np.nan)
            kurt = np.where(e[:, 1] > 0, e[:, 3] / e[:, 1] ** 2, np.nan)
        max_act = np.zeros(len(self.latents), np.float64)
        if len(self.top_lat):
            np.maximum.at(max_act, self.slots(self.top_lat), self.top_val.astype(np.float64))
        return {
            "density": self.fires / n,
            "mean": e[:, 0],
            "mean_sq": e[:, 1],
            "skew": skew,
            "kurtosis": kurt,
            "max": max_act,
        }

    def top_of(self, latent: int) -> list[tuple[int, int, float]]:
        """(window, position, activation) of one latent's top windows, largest first."""
        lo, hi = np.searchsorted(self.top_lat, [latent, latent + 1])  # sorted by latent (top_windows)
        at = range(lo, hi)
        return [(int(self.top_win[i]), int(self.top_pos[i]), float(self.top_val[i])) for i in at]

    def quantile_samples(self, latent: int, bins: int, per_bin: int) -> list[dict]:
        """Sampled positive activations of one latent in `bins` equal-count activation bins (the
        bins are the sample's quantiles), `per_bin` from each (those with the smallest keys: a
        uniform draw within the bin). Each: window, position, activation, bin's range and share."""
        lo, hi = np.searchsorted(self.smp_lat, [latent, latent + 1])  # sorted by latent (bottom_keys)
        at = np.arange(lo, hi)
        if not len(at):
            return []
        order = at[np.lexsort((self.smp_row[at], self.smp_val[at]))]
        out = []
        for b, part in enumerate(np.array_split(order, bins)):
            if not len(part):
                continue
            lo, hi = float(self.smp_val[part[0]]), float(self.smp_val[part[-1]])
            chosen = part[np.lexsort((self.smp_row[part], self.smp_key[part]))][:per_bin]
            for i in sorted(chosen, key=lambda i: -float(self.smp_val[i])):
                row = int(self.smp_row[i])
                out.append(
                    {
                        "window": row // POS_STRIDE,
                        "pos": row % POS_STRIDE,
                        "act": float(self.smp_val[i]),
                        "bin": b,
                        "bin_min": lo,
                        "bin_max": hi,
                        "bin_share": len(part) / len(at),
                    }
                )
        return out
