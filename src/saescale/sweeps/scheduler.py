"""Run a sweep's training runs concurrently on a job backend, as resources allow.

A sweep is a list of training runs (one per Hydra multirun job). Each run is submitted as its own
job (a Ray Job: its own driver process, so a crash or a bad config fails that run alone), at most
as many at once as the cluster's CPUs/GPUs hold; a run whose `result.json` already exists with the
run's own `config_hash` is finished and is not run again, so re-running the sweep resumes it. The
scheduler knows nothing of Ray: `JobBackend` is the five calls it needs.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from saescale import storage
from saescale.console import one_line

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SweepError(RuntimeError):
    """A sweep cannot start (e.g. a run needs more than the whole cluster)."""


@dataclass
class SweepRun:
    """One training run of the sweep and what became of it."""

    num: int
    overrides: list[str]
    run_name: str
    output_dir: str  # where the run writes result.json
    cpus: float  # Ray CPUs the run holds while training (workers x cpus_per_worker + 1 for Ray Data)
    gpus: float = 0.0
    storage_options: dict | None = None
    config_hash: str | None = None  # saescale.app.run_identity.config_hash of the run's config
    status: str = "pending"  # pending | running | finished | failed
    action: str = "run"  # run | skipped (finished before this sweep started)
    job_id: str | None = None
    start_time: float | None = None  # unix seconds, from the job server
    end_time: float | None = None
    error: str | None = None
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def result_url(self) -> str:
        return storage.join(self.output_dir, "result.json")


class BackendUnavailable(RuntimeError):
    """A job-server call failed in a way that may pass (connection refused or reset, a timeout, a
    5xx answer). Backends raise it for those only: the scheduler retries it (`RetryPolicy`), and
    any other error of a call fails that call's run at once."""


@dataclass
class RetryPolicy:
    """How long to keep retrying one job-server call: capped exponential backoff with jitter
    (wait n is first_wait_s x 2^(n-1), at most max_wait_s, less a random share of up to `jitter`
    of it, so runs polled together do not retry in step), until the next wait would take the
    time spent on the call past budget_s. A server restart or a dropped connection is survived;
    a server gone for good fails each run it holds after about budget_s."""

    first_wait_s: float = 1.0
    max_wait_s: float = 30.0
    budget_s: float = 300.0
    jitter: float = 0.5
    sleep: Callable[[float], None] = time.sleep  # tests pass a recorder instead of waiting
    rng: random.Random = field(default_factory=random.Random)

    def wait(self, attempt: int) -> float:
        nominal = min(self.max_wait_s, self.first_wait_s * 2 ** (attempt - 1))
        return nominal * (1.0 - self.jitter * self.rng.random())


def call_with_retries(what: str, call: Callable[[], Any], policy: RetryPolicy) -> Any:
    """`call()`, retried while it raises BackendUnavailable and the budget allows, with one log
    line per retry (what, attempt, error, wait). Past the budget the last error is raised, with
    the attempts and seconds spent added to its message."""
    from tqdm import tqdm

    start, waited, attempt = time.monotonic(), 0.0, 1
    while True:
        try:
            return call()
        except BackendUnavailable as exc:
            wait = policy.wait(attempt)
            spent = max(waited, time.monotonic() - start)
            if spent + wait > policy.budget_s:
                raise BackendUnavailable(f"{exc} (gave up after {attempt} attempts over {spent:.0f} s)") from exc
            tqdm.write(f"[sweep] {what}: attempt {attempt} failed ({exc}); retrying in {wait:.1f} s")
            policy.sleep(wait)
            waited += wait
            attempt += 1


class JobBackend(Protocol):
    def submit(self, run: SweepRun) -> str: ...
    def status(self, job_id: str) -> str: ...  # PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED
    def info(self, job_id: str) -> dict[str, Any]: ...  # start_time, end_time (unix s), message
    def logs(self, job_id: str) -> str: ...
    def stop(self, job_id: str) -> None: ...


def read_result(run: SweepRun) -> dict[str, Any] | None:
    """The run's result.json, or None if it has not finished."""
    try:
        if storage.exists(run.result_url, run.storage_options):
            return storage.read_json(run.result_url, run.storage_options)
    except (storage.StorageError, ValueError):
        return None
    return None


def finished_same_config(run: SweepRun, result: dict[str, Any] | None) -> bool:
    """A result.json marks the run finished only if it was written under the run's own config: a
    run whose output_dir holds another config's result (an explicit output_dir shared by runs, or
    a result from before config hashes) is run, not skipped."""
    return result is not None and result.get("config_hash") == run.config_hash


def shown_overrides(run: SweepRun) -> str:
    """The run's overrides for logs and the results table, with any user:password@ in URLs dropped."""
    return " ".join(
        f"{o.split('=', 1)[0]}={storage.redact(o.split('=', 1)[1])}" if "=" in o else o for o in run.overrides
    )


def _fits(run: SweepRun, used: tuple[float, float], capacity: tuple[float, float] | None) -> bool:
    if capacity is None:
        return True
    return used[0] + run.cpus <= capacity[0] + 1e-9 and used[1] + run.gpus <= capacity[1] + 1e-9


def run_sweep(
    runs: list[SweepRun],
    backend: JobBackend,
    capacity: tuple[float, float] | None,
    max_concurrent: int | None = None,
    poll_s: float = 2.0,
    log_dir: str | None = None,
    skip_finished: bool = True,
    on_change: Callable[[list[SweepRun]], None] | None = None,
    retry: RetryPolicy | None = None,
) -> list[SweepRun]:
    """Run every unfinished run, several at once when (cpus, gpus) `capacity` allows (None: no
    limit but `max_concurrent`); a failed run is recorded and the others go on. Job-server calls
    that fail transiently are retried (`retry`); one that keeps failing fails its run only.
    Returns `runs`."""
    from tqdm import tqdm

    if max_concurrent is not None and max_concurrent < 1:
        raise SweepError(f"hydra.launcher.max_concurrent must be at least 1 (or null), got {max_concurrent}")
    if not poll_s > 0:
        raise SweepError(f"hydra.launcher.poll_s must be a positive number of seconds, got {poll_s}")
    for run in runs:
        if capacity is not None and (run.cpus > capacity[0] + 1e-9 or run.gpus > capacity[1] + 1e-9):
            raise SweepError(
                f"run {run.num} ({run.run_name}) needs {run.cpus:g} CPUs and {run.gpus:g} GPUs; "
                f"the cluster has {capacity[0]:g} CPUs and {capacity[1]:g} GPUs"
            )
        done = read_result(run) if skip_finished else None
        if finished_same_config(run, done):
            run.status, run.action, run.result = "finished", "skipped", done
    retry = retry or RetryPolicy()
    pending = [r for r in runs if r.status == "pending"]
    running: list[SweepRun] = []
    bar = tqdm(total=len(runs), initial=len(runs) - len(pending), desc="sweep", unit="run", mininterval=5)
    bar.postfix_state = None
    try:
        while pending or running:
            used = (sum(r.cpus for r in running), sum(r.gpus for r in running))
            while (
                pending
                and (max_concurrent is None or len(running) < max_concurrent)
                and (not running or _fits(pending[0], used, capacity))
            ):
                run = pending.pop(0)
                try:
                    run.job_id = call_with_retries(
                        f"submitting run {run.num} {run.run_name}", lambda r=run: backend.submit(r), retry
                    )
                except Exception as exc:  # noqa: BLE001 - this run fails, the sweep goes on
                    _fail(run, f"could not submit its job: {one_line(exc)}")
                    bar.update(1)
                    if on_change:
                        on_change(runs)
                    continue
                run.status = "running"
                running.append(run)
                used = (used[0] + run.cpus, used[1] + run.gpus)
                tqdm.write(f"[sweep] started run {run.num} {run.run_name} ({shown_overrides(run)}) as {run.job_id}")
            for run in list(running):
                try:
                    state = call_with_retries(
                        f"status of run {run.num} {run.run_name} ({run.job_id})",
                        lambda r=run: backend.status(r.job_id),
                        retry,
                    )
                except Exception as exc:  # noqa: BLE001 - this run fails, the sweep goes on
                    running.remove(run)
                    _lost(run, exc, backend)
                else:
                    if state not in TERMINAL:
                        continue
                    running.remove(run)
                    _collect(run, state, backend, log_dir, retry)
                bar.update(1)
                if on_change:
                    on_change(runs)
            state = {"running": len(running), "failed": sum(r.status == "failed" for r in runs)}
            if state != bar.postfix_state:  # redraw on change only (logs are not terminals)
                bar.postfix_state = state
                bar.set_postfix(state)
            if running:
                time.sleep(poll_s)  # polling the job server, not synchronisation
    except BaseException:
        for run in running:  # do not leave orphaned runs training after Ctrl-C
            with contextlib.suppress(Exception):  # best effort on the way out
                backend.stop(run.job_id)
        raise
    finally:
        bar.close()
    return runs


def _fail(run: SweepRun, error: str) -> None:
    run.status, run.error = "failed", error[:500]
    print(f"[sweep] run {run.num} {run.run_name} FAILED: {run.error}", flush=True)


def _lost(run: SweepRun, exc: Exception, backend: JobBackend) -> None:
    """The job server no longer answers for this run: record it as failed (a rerun of the sweep
    runs it again) and ask once, best effort, to stop its job so that it cannot train twice."""
    with contextlib.suppress(Exception):  # the server is what failed
        backend.stop(run.job_id)
    _fail(run, f"lost track of job {run.job_id}: {one_line(exc)}")


def _optional(what: str, call: Callable[[], Any], retry: RetryPolicy, default: Any) -> Any:
    """A call whose answer the run's outcome does not depend on (times, logs)."""
    try:
        return call_with_retries(what, call, retry)
    except Exception as exc:  # noqa: BLE001
        print(f"[sweep] {what}: {one_line(exc)}", flush=True)
        return default


def _collect(
    run: SweepRun, state: str, backend: JobBackend, log_dir: str | None, retry: RetryPolicy | None = None
) -> None:
    retry = retry or RetryPolicy()
    info = _optional(f"job info of run {run.num}", lambda: backend.info(run.job_id), retry, {})
    run.start_time, run.end_time = info.get("start_time"), info.get("end_time")
    log_text = _optional(f"job logs of run {run.num}", lambda: backend.logs(run.job_id), retry, "(no logs)")
    if log_dir:
        os.makedirs(os.path.join(log_dir, str(run.num)), exist_ok=True)
        # Ray echoes the entrypoint (the overrides) into the log: drop user:password@ from URLs
        safe = storage.redact(log_text)
        storage.write_bytes_atomic(os.path.join(log_dir, str(run.num), "job.log"), safe.encode())
    result = read_result(run) if state == "SUCCEEDED" else None
    if result is not None:
        run.status, run.result = "finished", result
        print(
            f"[sweep] run {run.num} {run.run_name} finished: "
            + ", ".join(f"{k}={result.get(k)}" for k in ("steps", "heldout_nmse", "dead_fraction")),
            flush=True,
        )
        return
    run.status = "failed"
    errors = [line for line in log_text.splitlines() if line.startswith("error:") or "Error" in line]
    run.error = (errors[-1] if errors else info.get("message") or state)[:500]
    if state == "SUCCEEDED":
        run.error = f"the job succeeded but wrote no {run.result_url}"
    print(f"[sweep] run {run.num} {run.run_name} FAILED: {run.error} (log: {log_dir}/{run.num}/job.log)", flush=True)


# ------------------------------------------------------------------------- the results table
RESULT_COLUMNS = (
    "steps",
    "tokens",
    "heldout_nmse",
    "train_fvu",
    "dead_fraction",
    "compute",
    "tokens_to_convergence",
    "model",
    "hook",
    "d_in",
    "dp",
    "tp",
    "train_wall_s",
)


def results_rows(runs: list[SweepRun]) -> list[dict[str, Any]]:
    """One row per run: its settings, status, final metrics, tokens, compute and timing."""
    rows = []
    for run in runs:
        res = run.result or {}
        row: dict[str, Any] = {
            "num": run.num,
            "run_name": run.run_name,
            "overrides": shown_overrides(run),
            "status": run.status,
            "action": run.action,
            "n_latents": res.get("n_latents"),
            "k": res.get("k"),
            "job_id": run.job_id,
            "start_time": run.start_time,
            "end_time": run.end_time,
            "job_wall_s": (run.end_time - run.start_time) if run.start_time and run.end_time else None,
            "error": run.error,
            "output_dir": storage.redact(run.output_dir),
        }
        row.update({c: res.get(c) for c in RESULT_COLUMNS})
        if row["n_latents"] is None:  # failed before writing a result: read N, k from the overrides
            for o in run.overrides:
                key, _, value = o.partition("=")
                if key.lstrip("+") in ("sae.n_latents", "sae.k") and value.isdigit():
                    row[key.lstrip("+").split(".")[1]] = int(value)
        rows.append(row)
    return rows


def write_results(runs: list[SweepRun], sweep_dir: str) -> str:
    """results.parquet (and a .csv twin for reading by eye), each written atomically."""
    import io

    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(results_rows(runs))
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    url = storage.join(sweep_dir, "results.parquet")
    storage.write_bytes_atomic(url, buffer.getvalue())
    csv = io.BytesIO()
    pacsv.write_csv(table, csv)
    storage.write_bytes_atomic(storage.join(sweep_dir, "results.csv"), csv.getvalue())
    return url


def plot_timeline(runs: list[SweepRun], path: str) -> None:
    """A Gantt chart of the runs' job times: overlapping bars are runs that trained at once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in runs if r.start_time and r.end_time]
    if not timed:
        return
    t0 = min(r.start_time for r in timed)
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(timed) + 1.2))
    for i, r in enumerate(timed):
        ax.barh(
            i,
            r.end_time - r.start_time,
            left=r.start_time - t0,
            color="tab:blue" if r.status == "finished" else "tab:red",
        )
    ax.set_yticks(range(len(timed)), [r.run_name for r in timed], fontsize=7)
    ax.set(xlabel="seconds since the first run started", title="sweep timeline (red: failed)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
