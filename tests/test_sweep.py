"""A Hydra multirun sweep of the training job on a real embedded Ray cluster: every run is its own
Ray Job, runs train at the same time when the cluster has room, a failing run does not stop the
others, and re-running the sweep skips finished runs. Results land in one Parquet table."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = "sweep-ztest"


def run_sweep(tmp_path, cache: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SAESCALE_RUNS=str(tmp_path), WANDB_MODE="offline", RAY_DEDUP_LOGS="0")
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, os.path.join(ROOT, "jobs", "train.py"), "-m",
           # k=1024 > n_latents: those two runs fail their config check inside their own job
           "sae.n_latents=256,512", "sae.k=8,1024",
           f"data.cache={cache}", "data.heldout_tokens=512", "data.shuffle_buffer_rows=256",
           "parallel.workers=1", "parallel.tp=1", "train.batch_size=256", "train.epochs=1", "train.log_every=1",
           "export.saelens=false", "export.sparsify=false",
           f"hydra.sweep.dir={tmp_path}/sweeps/{SWEEP}", "hydra.launcher.num_cpus=4", "hydra.launcher.poll_s=0.5"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)


def read_table(tmp_path) -> dict[tuple[int, int], dict]:
    rows = pq.read_table(tmp_path / "sweeps" / SWEEP / "results.parquet").to_pylist()
    return {(r["n_latents"], r["k"]): r for r in rows}


@pytest.mark.slow
def test_sweep_runs_concurrently_survives_a_failing_run_and_resumes(tmp_path, small_cache):
    proc = run_sweep(tmp_path, small_cache)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]  # the sweep reports its failed runs in its exit code
    assert "2 finished" in log and "2 failed" in log, log[-3000:]
    table = read_table(tmp_path)
    assert sorted(table) == [(256, 8), (256, 1024), (512, 8), (512, 1024)]
    a, b = table[(256, 8)], table[(512, 8)]
    for row in (a, b):
        assert row["status"] == "finished" and row["action"] == "run", row
        assert 0 < row["heldout_nmse"] < 1 and row["dead_fraction"] is not None
        assert row["tokens"] == row["steps"] * 256 > 0
        assert row["compute"] == pytest.approx(6 * row["tokens"] * 576 * row["n_latents"])
        assert 0 < row["tokens_to_convergence"] <= row["tokens"]
        assert row["model"] and row["hook"] == "resid_post.8"
    # the two good runs trained at the same time (their job intervals overlap)
    assert a["start_time"] < b["end_time"] and b["start_time"] < a["end_time"], (a, b)
    for key in ((256, 1024), (512, 1024)):
        assert table[key]["status"] == "failed"
        assert "k=1024" in table[key]["error"] or "k (1024)" in table[key]["error"], table[key]["error"]
        log_file = tmp_path / "sweeps" / SWEEP / str(table[key]["num"]) / "job.log"
        assert "error:" in log_file.read_text()
    # each run is its own wandb run, in the sweep's group
    for row in (a, b):
        runs = glob.glob(str(tmp_path / row["run_name"] / "wandb" / "offline-run-*" / "*.wandb"))
        assert len(runs) == 1 and SWEEP.encode() in open(runs[0], "rb").read()
    assert (tmp_path / "sweeps" / SWEEP / "timeline.png").stat().st_size > 0

    # re-running the sweep skips the finished runs and retries only the failed ones
    again = run_sweep(tmp_path, small_cache)
    table2 = read_table(tmp_path)
    for key in ((256, 8), (512, 8)):
        assert table2[key]["action"] == "skipped" and table2[key]["job_id"] is None
        assert table2[key]["heldout_nmse"] == table[key]["heldout_nmse"]
    assert table2[(256, 1024)]["status"] == "failed" and table2[(256, 1024)]["job_id"] != table[(256, 1024)]["job_id"]
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

    done = SweepRun(num=0, overrides=["sae.n_latents=256", "sae.k=8"], run_name="a", output_dir=str(tmp_path / "a"), cpus=2)
    storage.write_json_atomic(done.result_url, {"n_latents": 256, "k": 8, "heldout_nmse": 0.25, "tokens": 1024})
    run_sweep([done], backend=None, capacity=(4.0, 0.0))  # nothing to run: no backend call
    failed = SweepRun(num=1, overrides=["sae.n_latents=512", "+sae.k=2048"], run_name="b", output_dir=str(tmp_path / "b"),
                      cpus=2, status="failed", error="error: sae.k=2048 is larger than sae.n_latents=512")
    rows = results_rows([done, failed])
    assert rows[0]["status"] == "finished" and rows[0]["action"] == "skipped" and rows[0]["heldout_nmse"] == 0.25
    assert (rows[1]["n_latents"], rows[1]["k"], rows[1]["status"]) == (512, 2048, "failed")


def test_credentials_in_override_urls_never_reach_the_results_table(tmp_path):
    from saescale.sweeps.scheduler import SweepRun, results_rows

    run = SweepRun(num=0, overrides=["data.cache=s3://AKIAKEY:s3cr3t@bucket/cache", "sae.k=8"], run_name="r",
                   output_dir=str(tmp_path / "r"), cpus=2, status="failed", error="error: boom")
    row = results_rows([run])[0]
    assert "s3cr3t" not in str(row) and row["overrides"] == "data.cache=s3://***@bucket/cache sae.k=8"


def test_bad_launcher_settings_are_clear_errors(tmp_path):
    from saescale.sweeps.scheduler import SweepError, run_sweep

    with pytest.raises(SweepError, match="max_concurrent must be at least 1"):
        run_sweep([], backend=None, capacity=None, max_concurrent=0)
    with pytest.raises(SweepError, match="poll_s must be a positive"):
        run_sweep([], backend=None, capacity=None, poll_s=0)
