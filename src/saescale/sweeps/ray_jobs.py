"""Ray Jobs as the sweep's job backend: each run is `python jobs/train.py <overrides>` submitted
to the cluster's job server, exactly what `ray job submit` does by hand.

With no address, an embedded local Ray with its job server is started for the sweep (and
stopped after it); with an `http://` address the runs go to that cluster's job server; with a
Ray address (or RAY_ADDRESS, as inside a `ray job submit` of the sweep itself) the sweep joins
that cluster and uses its job server.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

from saescale.console import one_line
from saescale.net import free_port
from saescale.service.ray_local import apply_env_defaults, ensure_ray
from saescale.sweeps.scheduler import BackendUnavailable, SweepError, SweepRun

# the local folders a remote cluster does not need (uploaded as the jobs' working_dir otherwise)
WORKING_DIR_EXCLUDES = [".venv", ".git", "runs", "outputs", "multirun", "docs", "**/__pycache__"]


def is_transient(exc: BaseException) -> bool:
    """Whether a JobSubmissionClient call's error may pass on a retry: no connection, a dropped
    or timed-out one (requests' exceptions; the client raises them as they come), or a 5xx / 429
    answer (the client raises RuntimeError("Request failed with status code 503: ...")). A 4xx
    answer (no such job, a bad request) or an authentication error is final."""
    import requests

    if isinstance(
        exc,
        (
            requests.exceptions.ConnectionError,
            requests.exceptions.Timeout,
            requests.exceptions.ChunkedEncodingError,
            ConnectionError,
            TimeoutError,
        ),
    ):
        return True
    return isinstance(exc, RuntimeError) and re.search(r"status code (5\d\d|429)\b", str(exc)) is not None


class RayJobsBackend:
    """Submits, polls and stops Ray Jobs; knows the cluster's size when it can see it."""

    def __init__(
        self, script: str, address: str | None = None, num_cpus: int | None = None, connect_timeout_s: float = 120.0
    ) -> None:
        apply_env_defaults()
        import ray
        from ray.job_submission import JobSubmissionClient

        self.script = os.path.abspath(script)
        self.cwd = os.getcwd()
        self.started_ray = False
        self.capacity: tuple[float, float] | None = None
        self._submission_ids: dict[int, str] = {}
        address = address or os.environ.get("RAY_ADDRESS")
        if address and address.startswith(("http://", "https://")):
            dashboard = address  # a remote job server: its size is not visible from here
        else:
            # logical CPUs beyond the cores leave Ray Data room beside the training workers
            started = ensure_ray(
                address, num_cpus or 2 * (os.cpu_count() or 1), dashboard_port=free_port(), log_to_driver=False
            )
            if started is None:
                raise SweepError("Ray is already initialised in this process; the sweep starts or joins its own")
            self.started_ray = started.embedded
            if not started.dashboard_url:
                raise SweepError(
                    "the Ray cluster has no dashboard, so no job server: start it with "
                    "`ray start --head` from an environment with ray[default]"
                )
            dashboard = "http://" + started.dashboard_url
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

    def _call(self, what: str, call: Callable[[], Any]) -> Any:
        """One job-server call; errors that may pass become BackendUnavailable (retried by the
        scheduler), the rest propagate as they are."""
        try:
            return call()
        except Exception as exc:
            if is_transient(exc):
                raise BackendUnavailable(
                    f"the Ray job server at {self.dashboard} failed {what}: {one_line(exc)[:300]}"
                ) from exc
            raise

    def submit(self, run: SweepRun) -> str:
        runtime_env = None if self.local else {"working_dir": self.cwd, "excludes": WORKING_DIR_EXCLUDES}
        # the same submission id on every attempt: a retry after a lost answer cannot start a second job
        submission_id = self._submission_ids.setdefault(run.num, f"{run.run_name}-{run.num}-{os.urandom(3).hex()}")
        try:
            job_id = self._call(
                "a submit",
                lambda: self.client.submit_job(
                    entrypoint=self.entrypoint(run),
                    runtime_env=runtime_env,
                    submission_id=submission_id,
                    metadata={"saescale_run": run.run_name, "sweep_job": str(run.num)},
                    entrypoint_num_cpus=0,
                ),
            )  # the training workers hold the CPUs, not the driver
        except RuntimeError as exc:
            if f"{submission_id} already exists" not in str(exc):
                raise
            job_id = submission_id  # an earlier attempt went through; its answer was lost
        del self._submission_ids[run.num]
        return job_id

    def status(self, job_id: str) -> str:
        return str(self._call("a status query", lambda: self.client.get_job_status(job_id)).value)

    def info(self, job_id: str) -> dict[str, Any]:
        info = self._call("a job info query", lambda: self.client.get_job_info(job_id))
        return {"start_time": _seconds(info.start_time), "end_time": _seconds(info.end_time), "message": info.message}

    def logs(self, job_id: str) -> str:
        try:
            return self._call("a logs query", lambda: self.client.get_job_logs(job_id))
        except BackendUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - a missing log must not fail the sweep
            return f"(no logs: {exc})"

    def stop(self, job_id: str) -> None:
        self._call("a stop request", lambda: self.client.stop_job(job_id))

    def close(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def _seconds(ms: int | None) -> float | None:
    """Ray's job times are epoch milliseconds (None before the job started or ended)."""
    return ms / 1000.0 if ms else None
