"""A Hydra multirun sweep of the training job on a real embedded Ray cluster: every run is its own
Ray Job, runs train at the same time when the cluster has room, a failing run does not stop the
others, and re-running the sweep skips finished runs. Results land in one Parquet table. The
finished runs differ only in train.lr, which their readable name does not show: each still gets
its own folder and config hash (the run identity of tests/test_run_identity.py, end to end)."""

from __future__ import annotations

import glob
import os
import pathlib
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from saescale import storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = "sweep-ztest"


def run_sweep(tmp_path, cache: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SAESCALE_RUNS=str(tmp_path), WANDB_MODE="offline", RAY_DEDUP_LOGS="0")
    env.pop("RAY_ADDRESS", None)
    cmd = [
        sys.executable,
        os.path.join(ROOT, "jobs", "train.py"),
        "-m",
        # k=1024 > n_latents: those two runs fail their config check inside their own job
        "train.lr=0.001,0.003",
        "sae.k=8,1024",
        "sae.n_latents=256",
        f"data.cache={cache}",
        "data.heldout_tokens=512",
        "data.shuffle_buffer_rows=256",
        "parallel.workers=1",
        "parallel.tp=1",
        "train.batch_size=256",
        "train.epochs=1",
        "train.log_every=1",
        "export.saelens=false",
        "export.sparsify=false",
        f"hydra.sweep.dir={tmp_path}/sweeps/{SWEEP}",
        "hydra.launcher.num_cpus=4",
        "hydra.launcher.poll_s=0.5",
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)


LRS = ("0.001", "0.003")


def read_table(tmp_path) -> dict[tuple[str, int], dict]:
    """The results table keyed by (train.lr as given, k)."""
    rows = pq.read_table(tmp_path / "sweeps" / SWEEP / "results.parquet").to_pylist()
    table = {}
    for r in rows:
        (lr,) = [o.split("=", 1)[1] for o in r["overrides"].split() if o.startswith("train.lr=")]
        table[(lr, r["k"])] = r
    return table


@pytest.mark.slow
def test_sweep_runs_concurrently_survives_a_failing_run_and_resumes(tmp_path, small_cache):
    proc = run_sweep(tmp_path, small_cache)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]  # the sweep reports its failed runs in its exit code
    assert "2 finished" in log and "2 failed" in log, log[-3000:]
    table = read_table(tmp_path)
    assert sorted(table) == [(lr, k) for lr in LRS for k in (8, 1024)]
    a, b = table[(LRS[0], 8)], table[(LRS[1], 8)]
    for row in (a, b):
        assert row["n_latents"] == 256 and row["k"] == 8
        assert row["status"] == "finished" and row["action"] == "run", row
        assert 0 < row["heldout_nmse"] < 1 and row["dead_fraction"] is not None
        assert row["tokens"] == row["steps"] * 256 > 0
        assert row["compute"] == pytest.approx(6 * row["tokens"] * 576 * row["n_latents"])
        assert 0 < row["tokens_to_convergence"] <= row["tokens"]
        assert row["model"] and row["hook"] == "resid_post.8"
    # runs that differ only in train.lr: one folder each, each result with its own config hash
    assert a["output_dir"] != b["output_dir"] and a["run_name"] != b["run_name"]
    assert all(row["run_name"].startswith("resid8-n256-k8-") for row in (a, b))
    hashes = {storage.read_json(os.path.join(row["output_dir"], "result.json"))["config_hash"] for row in (a, b)}
    assert len(hashes) == 2
    # the two good runs trained at the same time (their job intervals overlap)
    assert a["start_time"] < b["end_time"] and b["start_time"] < a["end_time"], (a, b)
    for key in ((LRS[0], 1024), (LRS[1], 1024)):
        assert table[key]["status"] == "failed"
        assert "k=1024" in table[key]["error"] or "k (1024)" in table[key]["error"], table[key]["error"]
        log_file = tmp_path / "sweeps" / SWEEP / str(table[key]["num"]) / "job.log"
        assert "error:" in log_file.read_text()
    # each run is its own wandb run, in the sweep's group
    for row in (a, b):
        runs = glob.glob(str(tmp_path / row["run_name"] / "wandb" / "offline-run-*" / "*.wandb"))
        assert len(runs) == 1 and SWEEP.encode() in pathlib.Path(runs[0]).read_bytes()
    assert (tmp_path / "sweeps" / SWEEP / "timeline.png").stat().st_size > 0

    # re-running the sweep skips the finished runs and retries only the failed ones
    again = run_sweep(tmp_path, small_cache)
    table2 = read_table(tmp_path)
    for key in ((LRS[0], 8), (LRS[1], 8)):
        assert table2[key]["action"] == "skipped" and table2[key]["job_id"] is None
        assert table2[key]["heldout_nmse"] == table[key]["heldout_nmse"]
    failed = (LRS[0], 1024)
    assert table2[failed]["status"] == "failed" and table2[failed]["job_id"] != table[failed]["job_id"]
    # the launcher got through its results, timeline and wandb table with skipped runs in them:
    # its last line, so the non-zero exit is the failed runs' alone
    again_log = again.stdout + again.stderr
    assert "2 finished (2 skipped as already finished), 2 failed" in again_log, again_log[-3000:]
    assert again.returncode != 0


def test_a_run_larger_than_the_cluster_is_refused_before_anything_starts(tmp_path):
    from saescale.sweeps.scheduler import SweepError, SweepRun, run_sweep

    runs = [SweepRun(num=0, overrides=["parallel.workers=8"], run_name="big", output_dir=str(tmp_path / "big"), cpus=9)]
    # no backend call can happen: the check precedes every submission
    with pytest.raises(SweepError, match="needs 9 CPUs .* the cluster has 4 CPUs"):
        run_sweep(runs, backend=None, capacity=(4.0, 0.0))
    assert runs[0].status == "pending" and not (tmp_path / "big").exists()


def test_finished_runs_are_read_back_and_failed_ones_keep_their_settings(tmp_path):
    from saescale import storage
    from saescale.sweeps.scheduler import SweepRun, results_rows, run_sweep

    done = SweepRun(
        num=0, overrides=["sae.n_latents=256", "sae.k=8"], run_name="a", output_dir=str(tmp_path / "a"), cpus=2
    )
    storage.write_json_atomic(done.result_url, {"n_latents": 256, "k": 8, "heldout_nmse": 0.25, "tokens": 1024})
    run_sweep([done], backend=None, capacity=(4.0, 0.0))  # nothing to run: no backend call
    failed = SweepRun(
        num=1,
        overrides=["sae.n_latents=512", "+sae.k=2048"],
        run_name="b",
        output_dir=str(tmp_path / "b"),
        cpus=2,
        status="failed",
        error="error: sae.k=2048 is larger than sae.n_latents=512",
    )
    rows = results_rows([done, failed])
    assert rows[0]["status"] == "finished" and rows[0]["action"] == "skipped" and rows[0]["heldout_nmse"] == 0.25
    assert (rows[1]["n_latents"], rows[1]["k"], rows[1]["status"]) == (512, 2048, "failed")


def test_credentials_in_override_urls_never_reach_the_results_table(tmp_path):
    from saescale.sweeps.scheduler import SweepRun, results_rows

    run = SweepRun(
        num=0,
        overrides=["data.cache=s3://AKIAKEY:s3cr3t@bucket/cache", "sae.k=8"],
        run_name="r",
        output_dir=str(tmp_path / "r"),
        cpus=2,
        status="failed",
        error="error: boom",
    )
    row = results_rows([run])[0]
    assert "s3cr3t" not in str(row) and row["overrides"] == "data.cache=s3://***@bucket/cache sae.k=8"


def test_bad_launcher_settings_are_clear_errors(tmp_path):
    from saescale.sweeps.scheduler import SweepError, run_sweep

    with pytest.raises(SweepError, match="max_concurrent must be at least 1"):
        run_sweep([], backend=None, capacity=None, max_concurrent=0)
    with pytest.raises(SweepError, match="poll_s must be a positive"):
        run_sweep([], backend=None, capacity=None, poll_s=0)


class FlakyJobServer:
    """A job backend whose job-server calls fail transiently: a Ray-free stand-in for a Ray job
    server that refuses connections or answers 503 now and then (RayJobsBackend turns exactly
    those into BackendUnavailable; the test below checks that on the real client). A job
    finishes on its second status query and writes its result.json; `failures[(call, num)]` is
    how many times that call fails for run `num` before it answers (None: it never does)."""

    def __init__(self, runs, failures):
        self.runs = {r.num: r for r in runs}
        self.failures = dict(failures)
        self.calls: list[tuple[str, int]] = []
        self.polls: dict[int, int] = {}

    def _call(self, what: str, num: int) -> None:
        from saescale.sweeps.scheduler import BackendUnavailable

        self.calls.append((what, num))
        left = self.failures.get((what, num), 0)
        if left is None or left > 0:
            self.failures[(what, num)] = None if left is None else left - 1
            raise BackendUnavailable(f"connection refused ({what} #{num})")

    def submit(self, run):
        self._call("submit", run.num)
        return f"job-{run.num}"

    def status(self, job_id):
        from saescale import storage

        num = int(job_id.split("-")[1])
        self._call("status", num)
        self.polls[num] = self.polls.get(num, 0) + 1
        if self.polls[num] < 2:
            return "RUNNING"
        storage.write_json_atomic(self.runs[num].result_url, {"steps": 3, "heldout_nmse": 0.5})
        return "SUCCEEDED"

    def info(self, job_id):
        return {"start_time": 1.0, "end_time": 2.0, "message": ""}

    def logs(self, job_id):
        return "trained"

    def stop(self, job_id):
        self._call("stop", int(job_id.split("-")[1]))


def test_a_flaky_job_server_is_retried_and_fails_only_the_run_it_loses(tmp_path, capsys):
    import random

    from saescale.sweeps.scheduler import RetryPolicy, SweepRun, run_sweep

    runs = [
        SweepRun(
            num=i, overrides=[f"sae.k={8 * (i + 1)}"], run_name=f"r{i}", output_dir=str(tmp_path / f"r{i}"), cpus=1
        )
        for i in range(3)
    ]
    # run 0's submit fails twice then goes through; run 1's job is lost (every status query
    # fails, and so does the stop); run 2 sees one failed status query
    server = FlakyJobServer(runs, {("submit", 0): 2, ("status", 1): None, ("stop", 1): None, ("status", 2): 1})
    waits: list[float] = []
    policy = RetryPolicy(
        first_wait_s=1.0, max_wait_s=4.0, budget_s=12.0, jitter=0.5, sleep=waits.append, rng=random.Random(0)
    )
    run_sweep(runs, server, capacity=None, poll_s=0.01, retry=policy)

    assert [r.status for r in runs] == ["finished", "failed", "finished"]
    assert runs[0].result["steps"] == 3 and runs[2].result["steps"] == 3
    assert runs[1].error.startswith("lost track of job job-1: connection refused (status #1)")
    assert "gave up after" in runs[1].error
    assert ("stop", 1) in server.calls  # asked once to stop the job it lost, so it cannot train twice
    assert server.calls.count(("stop", 1)) == 1 and ("stop", 0) not in server.calls
    assert server.calls.count(("submit", 0)) == 3
    out = capsys.readouterr().out
    retries = [line for line in out.splitlines() if "retrying in" in line]
    assert len(retries) == len(waits)  # one line per retry: what, attempt, error, wait
    assert retries[0].startswith(
        "[sweep] submitting run 0 r0: attempt 1 failed (connection refused (submit #0)); retrying in "
    )
    # capped exponential backoff with jitter: the wait after attempt a is within [w/2, w] of
    # w = min(4, 2^(a-1)); the lost run's status query gave up before its waits passed the budget
    lost = []
    for line, wait in zip(retries, waits):
        attempt = int(line.split(": attempt ")[1].split()[0])
        nominal = min(4.0, 2.0 ** (attempt - 1))
        assert nominal / 2 <= wait <= nominal, (line, wait)
        if "status of run 1 " in line:
            lost.append(wait)
    assert len(lost) >= 4 and 12.0 - 4.0 < sum(lost) <= 12.0  # the next wait (at most 4 s) would pass 12 s
    assert "run 1 r1 FAILED: lost track of job job-1" in out


def test_job_server_errors_are_told_apart_on_the_real_client(tmp_path):
    """RayJobsBackend against a real HTTP job-server stand-in, through Ray's JobSubmissionClient:
    a 503 answer and a closed port are transient (retried), a 404 is final, and a submit retried
    after a lost answer reuses its submission id instead of starting a second job."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import ray
    import requests

    from saescale.sweeps.ray_jobs import RayJobsBackend
    from saescale.sweeps.scheduler import BackendUnavailable, SweepRun

    submitted: list[str] = []

    class JobServer(BaseHTTPRequestHandler):
        def _answer(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            if self.path == "/api/version":
                self._answer(200, {"version": "4", "ray_version": ray.__version__, "ray_commit": "x"})
            elif self.path == "/api/jobs/busy":
                self._answer(503, {"error": "the job server is restarting"})
            else:
                self._answer(404, {"error": "no such job"})

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            submitted.append(body["submission_id"])
            if len(submitted) == 1:
                self._answer(502, {"error": "bad gateway"})  # the first answer is lost on the way
            else:
                self._answer(400, {"error": f"Job with submission_id {body['submission_id']} already exists."})

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), JobServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    backend = RayJobsBackend(os.path.join(ROOT, "jobs", "train.py"), f"http://127.0.0.1:{server.server_port}")
    try:
        with pytest.raises(BackendUnavailable, match="status code 503"):
            backend.status("busy")
        with pytest.raises(RuntimeError, match="status code 404") as final:
            backend.status("gone")
        assert not isinstance(final.value, BackendUnavailable)
        run = SweepRun(num=0, overrides=["sae.k=8"], run_name="r0", output_dir=str(tmp_path / "r0"), cpus=1)
        with pytest.raises(BackendUnavailable, match="status code 502"):
            backend.submit(run)
        assert backend.submit(run) == submitted[0] == submitted[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    with pytest.raises(BackendUnavailable) as closed:  # nothing listens on the port any more
        backend.status("busy")
    assert isinstance(closed.value.__cause__, requests.exceptions.ConnectionError)


def test_a_sweep_beside_another_ray_runs_its_jobs(monkeypatch):
    """A second Ray on the machine (the README's `ray start --head`, another job's embedded Ray, a
    parallel test) holds Ray's fixed job-agent port 52365: the sweep's own Ray puts its agent on a
    free port, so its job server still runs jobs (with the fixed port it answered every submit
    with "No available agent")."""
    import socket
    import time

    from saescale.sweeps.ray_jobs import RayJobsBackend

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as that other Ray's agent does
    backend = None
    try:
        try:
            holder.bind(("", 52365))
            holder.listen()
        except OSError:
            pass  # another Ray on this machine listens there already
        backend = RayJobsBackend(os.path.join(ROOT, "jobs", "train.py"))
        job = backend.client.submit_job(entrypoint=f"{sys.executable} -c 'print(6 * 7)'")
        deadline = time.monotonic() + 120
        while not backend.client.get_job_status(job).is_terminal() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert backend.status(job) == "SUCCEEDED", backend.logs(job)
        assert "42" in backend.logs(job)
    finally:
        holder.close()
        if backend is not None:
            backend.close()
    import ray

    assert not ray.is_initialized()
