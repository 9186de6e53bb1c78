"""How often to checkpoint: a fixed number of steps, or `train.checkpoint_every=auto`.

Auto follows the Young/Daly rule: with a checkpoint that stalls training for C seconds and a
failure every M seconds on average (`train.checkpoint_mtbf_s`, the job's `ray.mtbf_s`), the
interval that loses the least time to checkpoints plus recomputation is about sqrt(2 C M)
(Young 1974; Daly 2006). Checkpoint too rarely and a run that fails often never gets past its
first checkpoint (measured: a worker killed every ~120 s against a checkpoint every ~150 s);
too often and the checkpoints themselves are the run.

The cost is measured, not assumed: the first checkpoint comes early (`FIRST_STEP`), and after
each one the interval in steps is set again from what the last one cost and the clean step time
(`write_overhead`). A checkpoint written in the background costs more than its stall: where the
writer competes with training for the same cores (a CPU run), the steps that overlap the write
are slower. That slowdown is measured against the steps that ran with no write in flight and
counted in the cost (measured on the 2-core soak: stalls of 0.02-0.09 s, but steps twice as slow
while the upload ran, so the stall alone chose a checkpoint every ~2 s and doubled the run). Under a (dp x tp) group every rank must checkpoint at the same step (the
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

    clean_step_s: float | None = None  # auto: the last step time measured with no write in flight

    def write_overhead(self, steps: int, steps_s: float, writing_steps: int, writing_s: float) -> tuple[float, float]:
        """(seconds the last checkpoint's background write added to training, a clean step's
        time), from the steps since it: `steps` steps took `steps_s` seconds, of which
        `writing_steps` (`writing_s` seconds) ran while the write was in flight; the overhead is
        their time beyond clean steps'. With no clean step since (a write as long as the
        interval), the last clean time counts."""
        clean_steps = steps - writing_steps
        if clean_steps > 0:
            self.clean_step_s = (steps_s - writing_s) / clean_steps
        clean = self.clean_step_s if self.clean_step_s is not None else steps_s / max(steps, 1)
        return max(0.0, writing_s - writing_steps * clean), clean

    def saved(
        self,
        step: int,
        stall_s: float,
        step_s: float,
        reduce: Callable[[list[float]], list[float]] = lambda values: values,
    ) -> int | None:
        """After the checkpoint at `step`: with auto, the next one's step from a checkpoint's cost
        (`stall_s`: its stall plus `write_overhead`) and the step time (their maxima over the
        ranks, so every rank agrees); returns the new interval in steps (None for a fixed cadence)."""
        if not self.auto:
            return None
        stall_s, step_s = reduce([stall_s, step_s])
        interval = young_daly_interval_s(stall_s, self.mtbf_s) / max(step_s, 1e-9)
        self.interval_steps = int(min(MAX_INTERVAL_STEPS, max(1, round(interval))))
        self.next_step = step + self.interval_steps
        return self.interval_steps
