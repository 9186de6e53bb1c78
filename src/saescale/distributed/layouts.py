"""The worker layouts a run may take: which (dp, tp) it can shrink to when nodes are lost and
grow back to when they return.

A run's rows come in `data.streams` canonical streams and a worker reads a whole number of them,
so a layout's worker count divides the streams; its TP degree is the largest that divides both
the worker count and the configured `parallel.tp` (the latents stay split evenly). The memory
planner then decides which of those fit a worker (`distributed.plan`): at fewer workers each one
holds more latents. No Ray here: the driver computes the layouts, the service's capacity gate
picks among them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from saescale.distributed.mesh import ParallelDims


@dataclass(frozen=True)
class Layout:
    workers: int
    tp: int
    micro_batches: int = 1  # the planner's micro-batches at this layout

    @property
    def dp(self) -> int:
        return self.workers // self.tp

    def dims(self) -> ParallelDims:
        return ParallelDims.from_world(self.workers, self.tp)

    def __str__(self) -> str:
        return f"{self.workers} workers (dp={self.dp} x tp={self.tp})"


def candidate_layouts(streams: int, max_workers: int, tp: int, min_workers: int = 1) -> list[Layout]:
    """Every layout from `max_workers` down to `min_workers` workers that can share the streams,
    largest first (the planner has not judged them yet)."""
    return [Layout(w, math.gcd(w, tp)) for w in range(max_workers, max(min_workers, 1) - 1, -1) if streams % w == 0]


def best_fitting(layouts: list[Layout], slots: int) -> Layout | None:
    """The largest layout whose workers fit in `slots` worker places, if any."""
    return next((layout for layout in layouts if layout.workers <= slots), None)
