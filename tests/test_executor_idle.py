"""`service.executor_idle`: the callback that keeps Ray Data's streaming executor from spinning
is hooked into the executor of the pinned Ray (it reaches into Ray's execution callbacks: if a
Ray upgrade moves them, this fails), and a pipeline run under it still yields every row. Its
effect on a resumed training run (3x slower steps for ~20 s without it) is measured by hand, see
the module's docstring; a small pipeline here does not reach the spinning state."""

from __future__ import annotations

import time

import ray

from saescale.service import executor_idle
from saescale.service.executor_idle import IdleBackoff, quiet_when_idle


def test_the_executor_sleeps_when_nothing_is_in_flight_and_still_yields_every_row(monkeypatch):
    counts = {"steps": 0, "idle": 0}
    original = IdleBackoff.on_execution_step

    def counting(self, executor) -> None:  # noqa: ANN001 - the executor runs in this process
        counts["steps"] += 1
        before = time.perf_counter()
        original(self, executor)
        counts["idle"] += time.perf_counter() - before >= executor_idle.IDLE_SLEEP_S / 2

    monkeypatch.setattr(IdleBackoff, "on_execution_step", counting)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    try:
        quiet_when_idle(ctx)
        quiet_when_idle(ctx)  # registering twice adds it once
        assert ctx.custom_execution_callback_classes.count(IdleBackoff) == 1
        rows = 0
        # a consumer slower than the reads: the executor runs out of work and waits for it
        for batch in ray.data.range(4000, override_num_blocks=4).iter_batches(batch_size=500):
            rows += len(batch["id"])
            time.sleep(0.05)  # the training step this batch feeds
        assert rows == 4000
        # the hook ran in Ray's executor loop, and slept in the steps that had nothing in flight
        assert counts["steps"] > 0 and counts["idle"] > 0, counts
    finally:
        ctx.custom_execution_callback_classes.clear()
        ray.shutdown()
