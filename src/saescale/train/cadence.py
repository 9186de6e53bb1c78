"""How often to checkpoint: a fixed number of steps, or `train.checkpoint_every=auto`.

Auto follows the Young/Daly rule: with a checkpoint that stalls training for C seconds and a
failure every M seconds on average (`train.checkpoint_mtbf_s`, the job's `ray.mtbf_s`), the
interval that loses the least time to checkpoints plus recomputation is about sqrt(2 C M)
(Young 1974; Daly 2006). Checkpoint too rarely and a run that fails often never gets past its
first checkpoint (measured: a worker killed every ~120 s against a checkpoint every ~150 s);
too often and the checkpoints themselves are the run.

The cost is measured, not assumed: the first checkpoint comes early (`FIRST_STEP`), and after
each one the interval in steps is set again from that checkpoint's stall and the mean step time
since the one before. Under a (dp x tp) group every rank must checkpoint at the same step (the
save is a collective), so both times are first reduced to their maximum over the ranks (`reduce`)
and every rank computes the same interval. `saescale plan` prints the interval a layout will
about get (`distributed.plan.plan_checkpoints`) before anything is measured.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from saescale.distributed.plan import young_daly_interval_s

FIRST_STEP = 20  # the first auto checkpoint: early enough to measure its cost before it matters
MAX_INTERVAL_STEPS = 100_000


@dataclass
class CheckpointCadence:
    """Which steps checkpoint: every `every` steps, or (every=None, auto) by Young/Daly."""

    every: int | None  # None with auto=False: no periodic checkpoints
    auto: bool = False
    mtbf_s: float = 86_400.0
    next_step: int = FIRST_STEP
    interval_steps: int | None = None  # auto: the last interval chosen

    @classmethod
    def of(cls, checkpoint_every: int | str | None, mtbf_s: float, start_step: int = 0) -> CheckpointCadence:
        if checkpoint_every == "auto":
            return cls(every=None, auto=True, mtbf_s=mtbf_s, next_step=start_step + FIRST_STEP)
        return cls(every=checkpoint_every)  # type: ignore[arg-type]

    def due(self, step: int) -> bool:
        if self.auto:
            return step >= self.next_step
        return bool(self.every) and step % self.every == 0  # type: ignore[operator]

    def saved(
        self,
        step: int,
        stall_s: float,
        step_s: float,
        reduce: Callable[[list[float]], list[float]] = lambda values: values,
    ) -> int | None:
        """After the checkpoint at `step`: with auto, the next one's step from this one's stall
        and the mean step time (their maxima over the ranks, so every rank agrees); returns the
        new interval in steps (None for a fixed cadence)."""
        if not self.auto:
            return None
        stall_s, step_s = reduce([stall_s, step_s])
        interval = young_daly_interval_s(stall_s, self.mtbf_s) / max(step_s, 1e-9)
        self.interval_steps = int(min(MAX_INTERVAL_STEPS, max(1, round(interval))))
        self.next_step = step + self.interval_steps
        return self.interval_steps
