"""A worker node lost mid-run, on a real multi-node Ray on this machine (`service.local_cluster`:
a head with no CPUs and two worker nodes of 2 CPUs, each its own raylet): the training job of the
embedded default's activations joins it (ray.address), and the test kills the node that runs
rank 0 (its raylet and every process on it) while rank 0 is held after a step
(`fault.hold_steps`: a file handshake, no sleeps).

- elastic: the run goes on with the layout the last node holds (1 worker, running the configured
  layout's 2 TP ranks as threads: `saescale.train.shard_threads`), resharding the step-8
  checkpoint; a node added back makes it grow to 2 workers again. The same SAE as the
  uninterrupted run, bit for bit, every layout recorded.
- not elastic: the restart waits ray.node_wait_s, then the job exits 1 with one line naming what
  is missing and the command that resumes it on 1 worker; that command finishes the run.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from helpers import wait_for, wait_registered

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 36  # 3 epochs of 3 training shards x 1024 rows, batch 256


@pytest.fixture(scope="module")
def cluster():
    from saescale.service.local_cluster import local_cluster

    with local_cluster(nodes=2, cpus_per_node=2) as running:
        yield running


def job_cmd(cache: str, address: str, run_id: str, *overrides: str) -> list[str]:
    args = [
        f"run_id={run_id}",
        f"ray.address={address}",
        "train.lr_rule=paper",
        f"data.cache={cache}",
        "data.heldout_tokens=1024",
        "data.shuffle_buffer_rows=512",
        "sae.n_latents=1024",
        "sae.k=16",
        "train.batch_size=256",
        "train.epochs=3",
        "train.log_every=2",
        "train.checkpoint_every=4",
        "wandb.mode=disabled",
        "export.saelens=false",
        *overrides,
    ]
    return [sys.executable, os.path.join(ROOT, "jobs", "train.py"), *args]


def job_env(runs) -> dict[str, str]:
    env = dict(os.environ, SAESCALE_RUNS=str(runs), RAY_DEDUP_LOGS="0")
    env.pop("RAY_ADDRESS", None)
    return env


def kill_node_of(cluster, pid: int) -> None:
    node = cluster.node_running(pid)
    assert node is not None, f"process {pid} (rank 0) is not on a worker node of the test cluster"
    cluster.kill_node(node)


def finish(proc: subprocess.Popen, timeout_s: float = 600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout_s)
    return proc.returncode, out


@pytest.fixture(scope="module")
def uninterrupted(cluster, small_cache, tmp_path_factory):
    runs = tmp_path_factory.mktemp("whole")
    proc = subprocess.run(
        job_cmd(small_cache, cluster.address, "whole"),
        capture_output=True,
        text=True,
        timeout=600,
        env=job_env(runs),
        cwd=ROOT,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return {**json.loads((runs / "whole" / "result.json").read_text()), "folder": str(runs / "whole")}


def final_sae(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "sae", "sae.safetensors"))


def assert_same_run(result: dict, whole: dict) -> None:
    assert result["steps"] == whole["steps"] == STEPS
    assert result["tokens"] == whole["tokens"]
    assert abs(result["heldout_nmse"] - whole["heldout_nmse"]) <= 1e-4 * whole["heldout_nmse"], (result, whole)


@pytest.mark.slow
def test_elastic_run_loses_a_node_goes_on_smaller_and_grows_back(cluster, small_cache, uninterrupted, tmp_path):
    out = tmp_path / "elastic"
    proc = subprocess.Popen(
        job_cmd(
            small_cache,
            cluster.address,
            "elastic",
            "parallel.elastic=true",
            "ray.elastic_check_s=0",
            "fault.hold_steps=[10,20]",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=job_env(tmp_path),
        cwd=ROOT,
    )
    try:
        rank0 = int(wait_for(out / "held-10", proc))
        wait_registered(tmp_path / "ray" / "elastic", 8, proc)
        kill_node_of(cluster, rank0)  # 2 workers; the last checkpoint: step 8
        (out / "release-10").write_text("")
        wait_for(out / "held-20", proc)  # the 1-worker layout, resumed from step 8
        cluster.add_node()  # resources return: the run grows back at its next step
        (out / "release-20").write_text("")
        code, log = finish(proc)
    finally:
        proc.kill()
    assert code == 0, log[-5000:]
    result = json.loads((out / "result.json").read_text())
    assert_same_run(result, uninterrupted)
    layouts = [(entry["step"], entry["workers"], entry["tp"]) for entry in result["layouts"]]
    assert layouts == [(0, 2, 2), (8, 1, 1), (20, 2, 2)], result["layouts"]
    assert "lost workers" in result["layouts"][1]["why"] and "returned" in result["layouts"][2]["why"]
    assert "going on with 1 workers (dp=1 x tp=1)" in log, log[-5000:]
    # the one worker ran the configured layout's 2 TP ranks as threads: the very same SAE
    assert result["layouts"][1]["shard_threads"] == 2
    assert "running the 2 TP ranks of 2 workers (dp=1 x tp=2) as threads" in log, log[-5000:]
    whole, got = final_sae(uninterrupted["folder"]), final_sae(out)
    assert all(torch.equal(got[name], whole[name]) for name in whole), (
        "the elastic run's SAE is not the uninterrupted one's"
    )
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["layout"] for e in logged if "layout" in e] == [
        "2 workers (dp=1 x tp=2)",
        "1 workers (dp=1 x tp=1)",
        "2 workers (dp=1 x tp=2)",
    ]


@pytest.mark.slow
def test_a_node_drained_for_preemption_makes_every_rank_checkpoint_and_the_run_goes_on(
    cluster, small_cache, uninterrupted, tmp_path
):
    """Ray's own preemption notice: the node of rank 0 is drained as a cloud autoscaler does
    before a spot reclaim (`LocalCluster.drain`). Every rank stops at the next step boundary and
    checkpoints there; the restart (not counted: ray.max_failures=0) leaves the draining node out
    and goes on with the one left, from that step (nothing lost), to the uninterrupted result."""
    out = tmp_path / "drained"
    cmd = job_cmd(
        small_cache, cluster.address, "drained", "parallel.elastic=true", "ray.max_failures=0", "fault.hold_steps=[10]"
    )
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=job_env(tmp_path), cwd=ROOT
    )
    node = None
    try:
        rank0 = int(wait_for(out / "held-10", proc))
        node = cluster.node_running(rank0)
        cluster.drain(node, deadline_s=120)
        (out / "release-10").write_text("")
        code, log = finish(proc)
    finally:
        proc.kill()
        if node is not None:  # the reclaim happens: the next tests get a fresh node
            cluster.kill_node(node)
            cluster.add_node()
    assert code == 0, log[-5000:]
    assert "preemption notice from Ray" in log, log[-5000:]
    stop = re.search(r"every rank stops at step (\d+) and checkpoints there", log) or re.search(
        r"preempted at step (\d+); its checkpoint is registered", log
    )
    assert stop and 10 <= int(stop.group(1)) < STEPS, log[-5000:]
    step = int(stop.group(1))
    assert f"resumed from the step-{step} checkpoint" in log, log[-5000:]  # nothing lost
    assert "not counted against ray.max_failures" in log, log[-5000:]
    result = json.loads((out / "result.json").read_text())
    assert_same_run(result, uninterrupted)
    layouts = [(entry["step"], entry["workers"], entry["tp"]) for entry in result["layouts"]]
    assert layouts == [(0, 2, 2), (step, 1, 1)], result["layouts"]


@pytest.mark.slow
def test_a_lost_node_without_elastic_ends_with_the_command_that_resumes_it(
    cluster, small_cache, uninterrupted, tmp_path
):
    out = tmp_path / "fixed"
    cmd = job_cmd(small_cache, cluster.address, "fixed", "ray.node_wait_s=5", "fault.hold_steps=[10]")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=job_env(tmp_path), cwd=ROOT
    )
    try:
        rank0 = int(wait_for(out / "held-10", proc))
        wait_registered(tmp_path / "ray" / "fixed", 8, proc)
        kill_node_of(cluster, rank0)
        (out / "release-10").write_text("")
        code, log = finish(proc)
    finally:
        proc.kill()
    assert code == 1, log[-5000:]
    line = next(ln for ln in log.splitlines() if "node_wait_s=5" in ln and "resume it on" in ln)
    assert "needs 2 workers of 1 CPU" in line and "hold 1 such worker(s)" in line, line
    resume = shlex.split(re.search(r"resume it on .*? with: (python jobs/train\.py .*)$", line).group(1))
    assert "parallel.workers=1" in resume and "parallel.tp=1" in resume and "data.streams=2" in resume
    proc = subprocess.run(
        [sys.executable, *resume[1:]], capture_output=True, text=True, timeout=600, env=job_env(tmp_path), cwd=ROOT
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "resumed from the step-8 checkpoint" in proc.stdout + proc.stderr
    assert_same_run(json.loads((out / "result.json").read_text()), uninterrupted)
