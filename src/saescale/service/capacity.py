"""Whether the cluster holds the run's worker layout, decided in the Ray Train controller before
every start of the worker group (the first, and each restart after a failure).

When a node is lost the restart would otherwise wait for its resources forever (Ray retries a
worker group that cannot be placed without end). Instead:
- elastic (`parallel.elastic`): the group starts with the largest of the run's layouts that the
  alive nodes hold (`distributed.layouts`); the workers take its (dp, tp) from their world size,
  reshard the last checkpoint and read the same rows per step as before. While the run is smaller
  than it was configured, rank 0 asks `larger_layout_fits` now and then; when it does, every rank
  checkpoints and leaves (as on a preemption) and the restart here starts the larger layout.
- not elastic: the restart waits up to `ray.node_wait_s` for the resources to return, then ends
  the run with `NodeLost`: one line naming what is missing and the layout that fits, from which
  the driver prints the command that resumes the run there.

The capacity count is Ray's view of the alive nodes (a killed node is seen dead after the GCS
health check: about 15-30 s by default, a few seconds with the test cluster's settings).
"""

from __future__ import annotations

import functools
import time
from typing import Any

from saescale.console import say
from saescale.distributed.layouts import Layout, best_fitting

POLL_S = 1.0


class NodeLost(RuntimeError):
    """The cluster no longer holds the run's layout, and did not again within ray.node_wait_s."""

    def __init__(self, message: str, fitting: Layout | None = None) -> None:
        super().__init__(message)
        self.fitting = fitting

    def __reduce__(self):  # Ray pickles it from the controller to the driver
        return (NodeLost, (str(self), self.fitting))


PROBE_S = 10.0  # how long a node has to run a probe task to count as alive after a failure


@functools.cache
def _probe_task():
    import ray

    @ray.remote(num_cpus=0, max_retries=0)
    def here() -> bool:
        return True

    return here


def draining_nodes() -> set[str]:
    """The ids of the nodes the GCS is draining (they refuse new work until they go)."""
    try:
        from ray._private.state import state

        return set(state.get_draining_nodes())
    except Exception:  # noqa: BLE001 - an older GCS without drains: none
        return set()


def alive_nodes(probe: bool = False) -> list[dict[str, float]]:
    """The total resources of each alive node of the connected Ray cluster. With `probe`, only
    the nodes that run a tiny task within PROBE_S: a node killed a moment ago is still alive to
    the GCS until its health check gives up on it (seconds to tens of seconds), and a restart
    counted onto it would wait for it in vain, or pack the workers where the reads need a CPU.
    A node being drained (a preemption announced: `preemption.ray_notice`) takes no new worker
    and never counts."""
    import ray

    draining = draining_nodes()
    nodes = [node for node in ray.nodes() if node.get("Alive") and node["NodeID"] not in draining]
    if probe and nodes:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        refs = {
            _probe_task()
            .options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
            .remote(): node
            for node in nodes
        }
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_S)
        for ref in pending:
            ray.cancel(ref, force=True)
        answered = []
        for ref in ready:
            try:
                ray.get(ref)
            except Exception:  # noqa: BLE001 - a node that cannot run a task does not count
                continue
            answered.append(refs[ref])
        nodes = answered
    return [dict(node["Resources"]) for node in nodes]


def worker_slots(
    nodes: list[dict[str, float]],
    cpus_per_worker: float,
    use_gpu: bool,
    data_cpus: float,
    data_cpus_per_worker: float = 0.0,
) -> int:
    """How many workers the nodes hold side by side, leaving `data_cpus` for the data reads, and
    `data_cpus_per_worker` more for each worker's own data pipeline (its LM actors, anywhere)."""
    slots = 0
    for resources in nodes:
        fit = int(resources.get("CPU", 0.0) // cpus_per_worker + 1e-9) if cpus_per_worker > 0 else 10**9
        if use_gpu:
            fit = min(fit, int(resources.get("GPU", 0.0)))
        slots += fit
    spare = sum(r.get("CPU", 0.0) for r in nodes) - data_cpus
    each = cpus_per_worker + data_cpus_per_worker
    if each > 0:
        slots = min(slots, int(spare // each + 1e-9))
    return max(slots, 0)


class CapacityCheck:
    """The cluster's worker places for one run's workers (see `worker_slots`)."""

    def __init__(
        self, cpus_per_worker: float, use_gpu: bool, data_cpus: float, data_cpus_per_worker: float = 0.0
    ) -> None:
        self.cpus_per_worker, self.use_gpu, self.data_cpus = cpus_per_worker, use_gpu, data_cpus
        self.data_cpus_per_worker = data_cpus_per_worker

    def slots(self, probe: bool = False) -> int:
        nodes = alive_nodes(probe)
        return worker_slots(nodes, self.cpus_per_worker, self.use_gpu, self.data_cpus, self.data_cpus_per_worker)

    def describe(self, workers: int) -> str:
        unit = f"{self.cpus_per_worker:g} CPU" + (" + 1 GPU" if self.use_gpu else "")
        if self.data_cpus_per_worker:
            return f"{workers} workers of {unit}, each with {self.data_cpus_per_worker:g} CPU of LM actors"
        return f"{workers} workers of {unit} (+{self.data_cpus:g} CPU for the data reads)"


def larger_layout_fits(layouts: list[Layout], current_workers: int, check: CapacityCheck) -> Layout | None:
    """The larger layout the cluster holds now, counting the places this run's workers hold (only
    nodes that answer a probe, not one killed a moment ago)."""
    best = best_fitting(layouts, check.slots(probe=True))
    return best if best is not None and best.workers > current_workers else None


class GrowWatch:
    """Rank 0 of an elastic run below its configured size: every `every_s` seconds, whether a
    larger layout fits again (then the run checkpoints and restarts on it)."""

    def __init__(self, layouts: list[Layout], workers: int, check: CapacityCheck, every_s: float) -> None:
        self.layouts, self.workers, self.check, self.every_s = layouts, workers, check, every_s
        self._next = time.monotonic() + every_s
        self.larger: Layout | None = None

    def __call__(self) -> bool:
        if self.larger is None and time.monotonic() >= self._next:
            self._next = time.monotonic() + self.every_s
            self.larger = larger_layout_fits(self.layouts, self.workers, self.check)
            if self.larger is not None:
                say(f"[saescale] layout: the cluster holds {self.larger} again: checkpointing to grow back")
        return self.larger is not None


def choose_layout(
    layouts: list[Layout], elastic: bool, check: CapacityCheck, wait_s: float, first_start: bool
) -> Layout:
    """The layout to start: the configured one (`layouts[0]`) if it fits, else (elastic) the largest
    that fits; waits up to `wait_s` when none does, then raises `NodeLost`."""
    target = layouts[0]
    choices = layouts if elastic else [target]
    deadline = time.monotonic() + wait_s
    waited = False
    while True:
        slots = check.slots(probe=not first_start)  # after a failure: nodes that answer now
        layout = best_fitting(choices, slots)
        if layout is not None:
            if waited:
                say(f"[saescale] layout: the cluster holds {layout} again; starting")
            elif layout != target:
                say(
                    f"[saescale] layout: the cluster holds {slots} of the run's {target.workers} workers: going on with {layout}"
                )
            return layout
        if time.monotonic() >= deadline:
            fitting = best_fitting(layouts, slots)
            what = "the run" if first_start else "the run's restart"
            raise NodeLost(
                f"{what} needs {check.describe(target.workers)} and the cluster's alive nodes hold "
                f"{slots} such worker(s) after waiting ray.node_wait_s={wait_s:g} s"
                + (f"; {fitting} would fit" if fitting is not None and not elastic else ""),
                fitting if not elastic else None,
            )
        if not waited:
            smallest = choices[-1].workers
            say(
                f"[saescale] layout: the cluster holds {slots} worker(s), the run needs "
                f"{smallest if elastic else target.workers}: waiting up to ray.node_wait_s={wait_s:g} s for nodes"
            )
            waited = True
        time.sleep(POLL_S)


@functools.cache
def _gate_class():
    from ray.train import ControllerError
    from ray.train.v2._internal.execution.callback import ControllerCallback

    class CapacityGate(ControllerCallback):
        """Runs in the Ray Train controller before each worker-group start (see the module)."""

        def __init__(self, layouts: list[Layout], elastic: bool, check: CapacityCheck, wait_s: float) -> None:
            self.layouts, self.elastic, self.check, self.wait_s = layouts, elastic, check, wait_s
            self.starts = 0

        def before_controller_execute_resize_decision(self, resize_decision: Any) -> None:
            self.starts += 1
            if self.starts == 1 and not any(node.get("CPU") for node in alive_nodes()):
                return  # an autoscaler's cluster with no worker node yet: Ray waits for it to scale up
            try:
                layout = choose_layout(self.layouts, self.elastic, self.check, self.wait_s, self.starts == 1)
            except NodeLost as lost:
                raise ControllerError(lost) from None
            resize_decision.num_workers = layout.workers  # the workers read their (dp, tp) from it

    return CapacityGate


def capacity_gate(layouts: list[Layout], elastic: bool, check: CapacityCheck, wait_s: float):
    """The Ray Train controller callback (for `RunConfig(callbacks=...)`) of the module's rules."""
    return _gate_class()(layouts, elastic, check, wait_s)
