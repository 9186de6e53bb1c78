"""A Ray cluster of several nodes on one machine: a head and worker nodes, each its own raylet
with its own CPUs, so that a node can be lost whole (its raylet and every worker on it) while the
head lives. The way to try cluster behaviour (node loss, elastic runs, preemption) on a laptop or
in CI: `saescale cluster` starts one and prints what to kill; the node-loss tests use it.

Built on Ray's own `ray.cluster_utils.Cluster` (what Ray's test suite uses). The GCS health check
is shortened (1 s x 3) so that a killed node is seen dead in seconds, not the default ~15-30 s,
and `drain` announces a node's preemption the way a cloud autoscaler does.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import psutil

from saescale.service.ray_local import apply_env_defaults

PREEMPTION_POLL_S = 0.5  # how often Ray Train looks for drained nodes on this cluster

FAST_HEALTH_CHECK = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 3,
}


class LocalCluster:
    """A head with `head_cpus` CPUs (0: it runs no workers or reads, like a real head) and
    `nodes` worker nodes of `cpus_per_node` CPUs each, started at once."""

    def __init__(self, nodes: int = 2, cpus_per_node: int = 2, head_cpus: int = 0) -> None:
        apply_env_defaults()
        # Ray Train's controller polls node drains every 5 s by default; the raylets started here
        # (and the controller they start) inherit this process's environment
        os.environ.setdefault("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", str(PREEMPTION_POLL_S))
        from ray.cluster_utils import Cluster

        self.cpus_per_node = cpus_per_node
        self._cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": head_cpus, "include_dashboard": False, "_system_config": FAST_HEALTH_CHECK},
        )
        self.nodes: list[Any] = []
        for _ in range(nodes):
            self.add_node()

    @property
    def address(self) -> str:
        """The GCS address a job joins (`ray.address=...`)."""
        return self._cluster.address

    def add_node(self, cpus: int | None = None) -> Any:
        node = self._cluster.add_node(num_cpus=self.cpus_per_node if cpus is None else cpus)
        self.nodes.append(node)
        return node

    def kill_node(self, node: Any) -> None:
        """Lose a node whole: its raylet and the processes on it are killed (no drain)."""
        self._cluster.remove_node(node, allow_graceful=False)
        self.nodes.remove(node)

    def drain(self, node: Any, deadline_s: int = 60, reason: str = "DRAIN_NODE_REASON_PREEMPTION") -> None:
        """Announce a node's end as a cloud's autoscaler does before a spot reclaim: the GCS drains
        it (no new work there) and Ray Train tells the workers on it (`preemption.ray_notice`).
        The node is not killed: `kill_node` it after the deadline, as the cloud would."""
        import time

        import ray._raylet
        from ray.core.generated import autoscaler_pb2

        deadline_ms = int(time.time() * 1000) + deadline_s * 1000
        accepted, why = ray._raylet.GcsClient(address=self.address).drain_node(
            node.node_id, autoscaler_pb2.DrainNodeReason.Value(reason), "saescale test drain", deadline_ms
        )
        if not accepted:
            raise RuntimeError(f"the GCS refused to drain node {node.node_id[:12]}: {why}")

    @staticmethod
    def raylet_pid(node: Any) -> int:
        return node.all_processes["raylet"][0].process.pid

    def node_running(self, pid: int) -> Any | None:
        """The worker node whose raylet started process `pid` (a Ray worker), if any."""
        with contextlib.suppress(psutil.Error):
            parents = {p.pid for p in psutil.Process(pid).parents()}
            return next((n for n in self.nodes if self.raylet_pid(n) in parents), None)
        return None

    def shutdown(self) -> None:
        self._cluster.shutdown()


@contextlib.contextmanager
def local_cluster(nodes: int = 2, cpus_per_node: int = 2, head_cpus: int = 0) -> Iterator[LocalCluster]:
    cluster = LocalCluster(nodes, cpus_per_node, head_cpus)
    try:
        yield cluster
    finally:
        cluster.shutdown()


def train_worker_pids() -> list[int]:
    """The PIDs of the Ray Train worker processes on this machine (Ray titles them
    `ray::RayTrainWorker...`)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if cmdline.startswith("ray::RayTrainWorker"):
            found.append(proc.pid)
    return found
