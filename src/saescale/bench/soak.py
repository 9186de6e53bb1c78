"""`saescale bench soak`: the training job with its cache and checkpoints on S3 (moto on loopback)
behind the fault proxy, run once uninterrupted and once under faults; the two results compared.

Schedules of the faulted run:
  random   until the run ends: a storage fault every `fault_every_s` on average (refused
           connections, resets, 503 SlowDown or 5 s delays on every request, each for 2 to
           `max_outage_s` seconds), a Ray Train worker SIGKILLed every `kill_every_s` on
           average (0: none) and one sent SIGTERM (a preemption notice: every rank checkpoints
           and the group restarts from there) every `preempt_every_s` on average (0: none);
           with `node_kill_every_s`, both runs are elastic (`parallel.elastic=true`) on a
           multi-node cluster on this machine (`service.local_cluster`) and the node running a
           worker is killed whole every `node_kill_every_s` on average, a new node joining
           `node_down_s` later
  single   one outage of `outage_s` seconds of refused connections, starting halfway through the
           uninterrupted run's requests: the wall-time cost of one outage

The faulted run must end as the uninterrupted one did: the same steps and tokens and, since a run
is deterministic from its checkpoints, bit-identical weights, also after a node loss that left
one worker running the configured TP ranks as threads (`saescale.train.shard_threads`); a run that took
another (dp, tp) sums in another order, so its held-out NMSE must be within 1e-4 (relative).
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saescale.bench.fault_proxy import FaultProxy

CREDENTIALS = {  # moto accepts any; the job's S3 clients need some
    "AWS_ACCESS_KEY_ID": "soak-key-id",
    "AWS_SECRET_ACCESS_KEY": "soak-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def say(line: str) -> None:
    print(f"[soak] {line}", file=sys.stderr, flush=True)


@dataclass
class Stage:
    """A bucket holding the cache on an S3 endpoint, the fault proxy in front of it, and the train
    job (`jobs/train.py` of `project`) reading the cache and writing checkpoints through the proxy.
    Each run's outputs land in `runs/<run_id>`."""

    endpoint: str
    bucket: str
    runs: Path
    project: Path
    proxy: FaultProxy
    env: dict[str, str]
    ray_tmp: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="soak", dir="/tmp"))
    cluster: Any = None  # a `LocalCluster` both runs join, for node kills

    @classmethod
    def create(cls, endpoint: str, cache: str, runs: Path, project: Path, seed: int = 0) -> Stage:
        import s3fs

        from saescale import storage

        env = dict(os.environ, **CREDENTIALS, SAESCALE_RUNS=str(runs), WANDB_MODE="offline", RAY_DEDUP_LOGS="0")
        env.pop("RAY_ADDRESS", None)
        bucket = f"s3://soak-{uuid.uuid4().hex[:12]}"
        options = storage.endpoint_options(endpoint)
        fs = s3fs.S3FileSystem(
            **options, key=CREDENTIALS["AWS_ACCESS_KEY_ID"], secret=CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
        )
        fs.mkdir(bucket)
        fs.put(cache.rstrip("/"), f"{bucket}/cache", recursive=True)
        proxy = FaultProxy(endpoint, seed=seed)
        proxy.start()
        return cls(endpoint, bucket, runs, project, proxy, env)

    @property
    def storage_options(self) -> dict[str, Any]:
        from saescale import storage

        return {
            **storage.endpoint_options(self.endpoint),
            "key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "skip_instance_cache": True,
        }

    def command(self, run_id: str, overrides: list[str]) -> list[str]:
        return [
            sys.executable,
            str(self.project / "jobs" / "train.py"),
            f"run_id={run_id}",
            f"data.cache={self.bucket}/cache",
            f"data.endpoint_url={self.proxy.url}",
            f"storage.url={self.bucket}/runs",
            f"storage.endpoint_url={self.proxy.url}",
            *overrides,
        ]

    def start(self, run_id: str, overrides: list[str], log: Path | None = None) -> subprocess.Popen:
        """The job, started; its console goes to `log` (else is captured)."""
        env = dict(self.env, RAY_TMPDIR=self.ray_tmp)  # its Ray's processes carry this: `worker_pids`
        out = open(log, "w") if log else subprocess.PIPE  # noqa: SIM115 - the caller waits on the process
        return subprocess.Popen(
            self.command(run_id, overrides),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=self.project,
        )

    def run(self, run_id: str, overrides: list[str], timeout: float = 3600) -> tuple[int, str, float]:
        """(exit code, console, wall seconds) of one job run to its end."""
        start = time.monotonic()
        proc = self.start(run_id, overrides)
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out, time.monotonic() - start

    def result(self, run_id: str) -> dict[str, Any]:
        return json.loads((self.runs / run_id / "result.json").read_text())

    def worker_pids(self) -> list[int]:
        """The Ray Train workers of the jobs this stage started (on its cluster's nodes, if any)."""
        import psutil

        if self.cluster is not None:
            from saescale.service.local_cluster import train_worker_pids

            return [pid for pid in train_worker_pids() if self.cluster.node_running(pid) is not None]

        pids = []
        for proc in psutil.process_iter(["cmdline", "environ"]):
            try:
                cmdline = " ".join(proc.info["cmdline"] or [])
                ours = (proc.info["environ"] or {}).get("RAY_TMPDIR") == self.ray_tmp
            except psutil.Error:
                continue
            if ours and "RayTrainWorker" in cmdline:
                pids.append(proc.pid)
        return pids

    def close(self) -> None:
        self.proxy.stop()


NMSE_RTOL = 1e-4  # a resized run's held-out NMSE against the uninterrupted one's


def compare(stage: Stage, reference: str, faulted: str) -> dict[str, Any]:
    """Steps, tokens, the largest weight difference of two runs' final SAEs, the layouts the faulted
    run took and, when it changed layout, whether its held-out NMSE is the reference's."""
    from saescale.formats.saved import load_sae

    a, b = stage.result(reference), stage.result(faulted)
    sae_a, sae_b = (load_sae(str(stage.runs / r / "sae"))[0] for r in (reference, faulted))
    diff = max(
        float((getattr(sae_a, n) - getattr(sae_b, n)).detach().abs().max())
        for n in ("W_enc", "b_enc", "W_dec", "b_pre")
    )
    same = a["steps"] == b["steps"] and a["tokens"] == b["tokens"]
    layouts = b.get("layouts") or []
    report = {
        "same_steps": a["steps"] == b["steps"],
        "same_tokens": a["tokens"] == b["tokens"],
        "max_abs_weight_diff": diff,
        "identical": same and diff == 0.0,
        "layouts": layouts,
        "resized": len(layouts) > 1,
    }
    nmse_a, nmse_b = a.get("heldout_nmse"), b.get("heldout_nmse")
    if nmse_a is not None and nmse_b is not None:
        report.update(heldout_nmse_reference=nmse_a, heldout_nmse_faulted=nmse_b)
        report["nmse_rel_diff"] = abs(nmse_b - nmse_a) / nmse_a
    report["same_math"] = same_math(layouts)
    report["matches"] = report["identical"] or (
        not report["same_math"] and same and report.get("nmse_rel_diff", 1.0) <= NMSE_RTOL
    )
    return report


def same_math(layouts: list[dict[str, Any]]) -> bool:
    """Whether every layout a run took computed the configured layout's steps: the same (dp, tp),
    or one worker running the configured TP ranks as threads (`saescale.train.shard_threads`).
    Only another (dp, tp) sums in another order (a run that did must match in NMSE instead)."""

    def steps_of(entry: dict[str, Any]) -> tuple[int, int]:
        return entry["dp"], entry.get("shard_threads") or entry["tp"]

    if not layouts:
        return True
    if any(e.get("shard_threads", 2) != 2 for e in layouts):
        return False  # more than 2 threads sum in rank order, which a ring all-reduce does not promise
    return all(steps_of(e) == steps_of(layouts[0]) for e in layouts)


class RandomFaults(threading.Thread):
    """Random storage faults and worker kills until `stop` is set (the `random` schedule)."""

    STORAGE = ("down", "reset", "503", "delay")

    def __init__(
        self,
        stage: Stage,
        fault_every_s: float,
        max_outage_s: float,
        kill_every_s: float,
        seed: int,
        preempt_every_s: float = 0.0,
        node_kill_every_s: float = 0.0,
        node_down_s: float = 60.0,
    ):
        super().__init__(daemon=True)
        self.node_kill_every_s, self.node_down_s = node_kill_every_s, node_down_s
        self.joins: queue.Queue[float] = queue.Queue()  # nodes to add, by the main thread
        self.stage, self.rng = stage, random.Random(seed)
        self.fault_every_s, self.max_outage_s, self.kill_every_s = fault_every_s, max_outage_s, kill_every_s
        self.preempt_every_s = preempt_every_s
        self.stop = threading.Event()
        self.injected: Counter[str] = Counter()
        self.events: list[dict[str, Any]] = []

    def _next_kill(self, now: float, every_s: float | None = None) -> float:
        every_s = self.kill_every_s if every_s is None else every_s
        return now + self.rng.expovariate(1 / every_s) if every_s > 0 else float("inf")

    def _signal_a_worker(self, sig: signal.Signals, fault: str, elapsed: float) -> None:
        pids = self.stage.worker_pids()
        if not pids:
            return
        pid = self.rng.choice(pids)
        say(f"t={elapsed:.0f} s: {sig.name} Ray Train worker {pid}")
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        self.injected[fault] += 1
        self.events.append({"t_s": round(elapsed, 1), "fault": fault})

    def _kill_a_node(self, elapsed: float) -> bool:
        """Kill the node running a Ray Train worker (its raylet and everything on it)."""
        cluster = self.stage.cluster
        nodes = [cluster.node_running(pid) for pid in self.stage.worker_pids()]
        nodes = [node for node in nodes if node is not None]
        if not nodes:
            return False
        node = self.rng.choice(nodes)
        say(
            f"t={elapsed:.0f} s: node lost (raylet {cluster.raylet_pid(node)}); a new node joins in {self.node_down_s:g} s"
        )
        cluster.kill_node(node)
        self.injected["node_loss"] += 1
        self.events.append({"t_s": round(elapsed, 1), "fault": "node_loss"})
        return True

    def run(self) -> None:
        start = time.monotonic()
        next_fault = start + self.rng.expovariate(1 / self.fault_every_s)
        next_kill = self._next_kill(start)
        next_preempt = self._next_kill(start, self.preempt_every_s)
        next_node_kill = self._next_kill(start, self.node_kill_every_s)
        returns: list[float] = []  # when lost nodes are replaced
        while not self.stop.wait(0.5):
            now = time.monotonic()
            if now >= next_node_kill:
                if self._kill_a_node(now - start):
                    returns.append(now + self.node_down_s)
                next_node_kill = self._next_kill(time.monotonic(), self.node_kill_every_s)
            for due in [t for t in returns if now >= t]:
                returns.remove(due)
                say(f"t={now - start:.0f} s: a node joins")
                self.joins.put(now - start)  # Ray starts a node from the main thread only: `serve_joins`
                self.injected["node_return"] += 1
                self.events.append({"t_s": round(now - start, 1), "fault": "node_return"})
            if now >= next_fault:
                kind, seconds = self.rng.choice(self.STORAGE), round(self.rng.uniform(2, self.max_outage_s), 1)
                say(f"t={now - start:.0f} s: storage {kind} for {seconds} s")
                if kind == "delay":
                    self.stage.proxy.start_fault("delay", delay_s=5.0)
                    self.stop.wait(seconds)
                    self.stage.proxy.stop_fault()
                else:
                    self.stage.proxy.outage_for(seconds, kind)
                    self.stop.wait(seconds)
                self.injected[f"storage_{kind}"] += 1
                self.events.append({"t_s": round(now - start, 1), "fault": kind, "seconds": seconds})
                next_fault = time.monotonic() + self.rng.expovariate(1 / self.fault_every_s)
            if now >= next_kill:
                self._signal_a_worker(signal.SIGKILL, "worker_kill", now - start)
                next_kill = self._next_kill(time.monotonic())
            if now >= next_preempt:
                self._signal_a_worker(signal.SIGTERM, "preemption", now - start)
                next_preempt = self._next_kill(time.monotonic(), self.preempt_every_s)


def serve_joins(proc: subprocess.Popen, faults: RandomFaults | None) -> int:
    """Wait for the job, adding the nodes the fault thread asks for meanwhile (Ray starts a node
    only from the main thread: it installs a signal handler); returns the job's exit code."""
    while True:
        try:
            return proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        while faults is not None and not faults.joins.empty():
            faults.joins.get()
            faults.stage.cluster.add_node()


def bench_soak(
    cache: str,
    project: str,
    overrides: list[str],
    schedule: str = "random",
    minutes: float | None = None,
    fault_every_s: float = 60.0,
    max_outage_s: float = 30.0,
    kill_every_s: float = 240.0,
    preempt_every_s: float = 0.0,
    node_kill_every_s: float = 0.0,
    node_down_s: float = 60.0,
    nodes: int = 2,
    outage_s: float = 30.0,
    retry_s: float = 120.0,
    max_failures: int = 20,
    seed: int = 0,
    out: str | None = None,
) -> dict[str, Any]:
    """Run the job uninterrupted, then under `schedule`; returns the comparison as JSON-able dict."""
    import logging

    from moto.server import ThreadedMotoServer

    from saescale.net import free_port

    root = Path(project).resolve()
    if not (root / "jobs" / "train.py").exists():
        raise ValueError(f"no jobs/train.py under {root}: run the soak from the project's root or pass --project")
    if not os.path.exists(os.path.join(cache, "manifest.json")):
        raise ValueError(
            f"no activation cache at {cache}: build one first (`make train` or python jobs/cache.py) or pass --cache"
        )
    if schedule not in ("random", "single"):
        raise ValueError(f"schedule must be 'random' or 'single', got {schedule!r}")
    runs = Path(out or tempfile.mkdtemp(prefix="saescale-soak-")).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server: a line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    stage = Stage.create(f"http://127.0.0.1:{port}", cache, runs, root, seed)
    common = [f"storage.retry_s={retry_s:g}", f"ray.max_failures={max_failures}", *overrides]
    if node_kill_every_s > 0:
        from saescale.service.local_cluster import LocalCluster

        os.environ.update(CREDENTIALS)  # the cluster's nodes hold them, as an instance role would
        stage.cluster = LocalCluster(nodes=nodes, cpus_per_node=2)
        say(f"a {nodes}-node cluster on this machine at {stage.cluster.address}; both runs elastic")
        common += [f"ray.address={stage.cluster.address}", "parallel.elastic=true"]
    try:
        say(f"uninterrupted run -> {runs / 'reference'}")
        before = stage.proxy.counts["forwarded"]
        code, log, reference_s = stage.run("reference", common)
        (runs / "reference.log").write_text(log)
        if code != 0:
            raise RuntimeError(f"the uninterrupted run failed (exit {code}); see {runs / 'reference.log'}")
        requests = stage.proxy.counts["forwarded"] - before
        say(f"uninterrupted: {reference_s:.0f} s, {requests} storage requests")
        faults = None
        if schedule == "single":
            stage.proxy.outage_after(requests // 2, outage_s, "down")
        else:
            faults = RandomFaults(
                stage, fault_every_s, max_outage_s, kill_every_s, seed, preempt_every_s, node_kill_every_s, node_down_s
            )
        start = time.monotonic()
        proc = stage.start("faulted", common, log=runs / "faulted.log")
        if faults is not None:
            faults.start()
        code = serve_joins(proc, faults)
        faulted_s = time.monotonic() - start
        if faults is not None:
            faults.stop.set()
            faults.join()
        stage.proxy.stop_fault()
        report: dict[str, Any] = {
            "bench": "soak",
            "schedule": schedule,
            "runs": str(runs),
            "reference_wall_s": round(reference_s, 1),
            "faulted_wall_s": round(faulted_s, 1),
            "wall_ratio": round(faulted_s / max(reference_s, 1e-9), 2),
            "faulted_exit_code": code,
            "survived": code == 0,
            "storage_requests_reference": requests,
            "proxy_counts": dict(stage.proxy.counts),
            "retries_logged": (runs / "faulted.log").read_text().count("retrying in"),
            "restarts": (runs / "faulted.log").read_text().count("[FailurePolicy] RETRY"),
            # restarts after a preemption notice: every rank checkpointed first, no failure counted
            "preemption_restarts": (runs / "faulted.log").read_text().count("not counted against ray.max_failures"),
        }
        if faults is not None:
            report.update(
                injected=dict(faults.injected),
                events=faults.events,
                minutes_requested=minutes,
                long_enough=minutes is None or faulted_s >= 60 * minutes,
            )
        else:
            report.update(outage_s=outage_s, outage_cost_s=round(faulted_s - reference_s, 1))
        if code == 0:
            report.update(compare(stage, "reference", "faulted"))
        return report
    finally:
        stage.close()
        server.stop()
        if stage.cluster is not None:
            stage.cluster.shutdown()
