"""Ray Jobs as the sweep's job backend: each run is `python jobs/train.py <overrides>` submitted
to the cluster's job server, exactly what `ray job submit` does by hand.

With no address, an embedded local Ray with its job server is started for the sweep (and
stopped after it); with an `http://` address the runs go to that cluster's job server; with a
Ray address (or RAY_ADDRESS, as inside a `ray job submit` of the sweep itself) the sweep joins
that cluster and uses its job server.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
import time
from typing import Any

from saescale.service.ray_local import apply_env_defaults
from saescale.sweeps.scheduler import SweepError, SweepRun

# the local folders a remote cluster does not need (uploaded as the jobs' working_dir otherwise)
WORKING_DIR_EXCLUDES = [".venv", ".git", "runs", "outputs", "multirun", "docs", "**/__pycache__"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RayJobsBackend:
    """Submits, polls and stops Ray Jobs; knows the cluster's size when it can see it."""

    def __init__(self, script: str, address: str | None = None, num_cpus: int | None = None,
                 connect_timeout_s: float = 120.0) -> None:
        apply_env_defaults()
        import ray
        from ray.job_submission import JobSubmissionClient

        self.script = os.path.abspath(script)
        self.cwd = os.getcwd()
        self.started_ray = False
        self.capacity: tuple[float, float] | None = None
        address = address or os.environ.get("RAY_ADDRESS")
        if address and address.startswith(("http://", "https://")):
            dashboard = address  # a remote job server: its size is not visible from here
        else:
            if address:
                ctx = ray.init(address=address, log_to_driver=False)
            else:
                # logical CPUs beyond the cores leave Ray Data room beside the training workers
                ctx = ray.init(num_cpus=num_cpus or 2 * (os.cpu_count() or 1), include_dashboard=True,
                               dashboard_host="127.0.0.1", dashboard_port=_free_port(), log_to_driver=False)
                self.started_ray = True
            if not ctx.dashboard_url:
                raise SweepError("the Ray cluster has no dashboard, so no job server: start it with "
                                 "`ray start --head` from an environment with ray[default]")
            dashboard = "http://" + ctx.dashboard_url
            resources = ray.cluster_resources()
            self.capacity = (float(resources.get("CPU", 0)), float(resources.get("GPU", 0)))
        self.local = self.started_ray or dashboard.startswith(("http://127.0.0.1", "http://localhost"))
        deadline = time.monotonic() + connect_timeout_s
        while True:  # the job server module comes up a few seconds after the head
            try:
                self.client = JobSubmissionClient(dashboard)
                break
            except (ConnectionError, RuntimeError) as exc:
                if time.monotonic() > deadline:
                    raise SweepError(f"no Ray job server answered at {dashboard}: {exc}") from exc
                time.sleep(1.0)
        self.dashboard = dashboard

    def entrypoint(self, run: SweepRun) -> str:
        args = " ".join(shlex.quote(o) for o in run.overrides)
        if self.local:  # same machine: run in the sweep's directory with the sweep's Python
            return f"cd {shlex.quote(self.cwd)} && {shlex.quote(sys.executable)} {shlex.quote(self.script)} {args}"
        return f"python {shlex.quote(os.path.relpath(self.script, self.cwd))} {args}"

    def submit(self, run: SweepRun) -> str:
        runtime_env = None if self.local else {"working_dir": self.cwd, "excludes": WORKING_DIR_EXCLUDES}
        return self.client.submit_job(
            entrypoint=self.entrypoint(run), runtime_env=runtime_env,
            submission_id=f"{run.run_name}-{run.num}-{os.urandom(3).hex()}",
            metadata={"saescale_run": run.run_name, "sweep_job": str(run.num)},
            entrypoint_num_cpus=0)  # the training workers hold the CPUs, not the driver

    def status(self, job_id: str) -> str:
        return str(self.client.get_job_status(job_id).value)

    def info(self, job_id: str) -> dict[str, Any]:
        info = self.client.get_job_info(job_id)
        seconds = (lambda ms: ms / 1000.0 if ms else None)
        return {"start_time": seconds(info.start_time), "end_time": seconds(info.end_time), "message": info.message}

    def logs(self, job_id: str) -> str:
        try:
            return self.client.get_job_logs(job_id)
        except Exception as exc:  # noqa: BLE001 - a missing log must not fail the sweep
            return f"(no logs: {exc})"

    def stop(self, job_id: str) -> None:
        self.client.stop_job(job_id)

    def close(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
