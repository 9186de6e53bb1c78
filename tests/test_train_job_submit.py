"""The training job submitted to a `ray start --head` (the README's one-machine cluster, started
with the machine's own CPU count) with its cache read from and checkpoints written to a real S3
server on loopback (moto), and the job's refusals of bad settings before anything starts.
Apart from tests/test_train_job.py (one long shared run) so that the two run side by side."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import ray_head, ray_job_submit
from saescale.formats.saved import load_sae
from test_train_job import BATCH, BIN, ROOT, job_args


@pytest.fixture(scope="module")
def ray_head_env(tmp_path_factory):
    """One `ray start --head` (the machine's CPU count, its own temp dir) for the module. Yields
    (env with the head's RAY_TMPDIR, the job server's address, $SAESCALE_RUNS of the jobs
    submitted to it)."""
    runs = tmp_path_factory.mktemp("head-runs")
    env = dict(os.environ, SAESCALE_RUNS=str(runs), WANDB_MODE="offline")
    # a submitted job has the head's environment: the S3 server's test credentials (as `s3_bucket` sets them)
    env.update(
        AWS_ACCESS_KEY_ID="testing-key-id", AWS_SECRET_ACCESS_KEY="testing-secret-key", AWS_DEFAULT_REGION="us-east-1"
    )
    with ray_head(env) as (_, address):
        yield env, address, runs


@pytest.mark.slow
def test_ray_job_submit_reads_cache_from_s3_and_checkpoints_there(small_cache, s3_bucket, ray_head_env):
    import s3fs

    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    fs.put(small_cache, f"{bucket}/cache", recursive=True)
    endpoint = options["client_kwargs"]["endpoint_url"]
    env, address, runs = ray_head_env  # the head's $SAESCALE_RUNS is what the submitted job sees
    job = ray_job_submit(
        [
            os.path.join(BIN, "ray"),
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            ROOT,
            "--",
            "python",
            "jobs/train.py",
            *job_args(
                f"{bucket}/cache",
                f"data.endpoint_url={endpoint}",
                f"storage.url={bucket}/runs",
                f"storage.endpoint_url={endpoint}",
                f"output_dir={bucket}/out",
                "export.evaluate=false",
                "train.max_steps=6",
            ),
        ],
        env=env,
        timeout=900,
        cwd=ROOT,
    )
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    if (os.cpu_count() or 1) < 3:  # the head has no CPU beside the 2 workers: they made room for the reads
        assert "each worker reserves 0.5 CPU" in job.stdout, job.stdout[-4000:]
    fs.invalidate_cache()
    result = json.loads(fs.cat_file(f"{bucket}/out/result.json"))
    assert result["steps"] == 6 and result["tokens"] == 6 * BATCH
    # the exports do not wait for export.evaluate, and land in the bucket beside the SAE
    assert "heldout_nmse" not in result
    for rel in (
        "export/saelens/sae_weights.safetensors",
        "export/saelens/cfg.json",
        "export/sparsify/sae.safetensors",
        "export/sparsify/cfg.json",
    ):
        assert fs.exists(f"{bucket}/out/{rel}"), rel
    # nothing of the remote output_dir went to a local `s3:/...` folder: not in the job's working
    # dir (a copy under Ray's temp dir), not here; Hydra's own files went to $SAESCALE_RUNS/hydra
    local = [
        os.path.join(d, n)
        for top in (env["RAY_TMPDIR"], str(runs))
        for d, dirs, files in os.walk(top)
        for n in dirs + files
    ] + os.listdir(ROOT)
    assert any(p.startswith(env["RAY_TMPDIR"]) and p.endswith(os.path.join("jobs", "train.py")) for p in local)
    assert [p for p in local if "s3:" in os.path.basename(p)] == []
    assert (runs / "hydra" / "tiny" / ".hydra" / "config.yaml").exists()
    assert result["checkpoint"].startswith(f"{bucket}/runs/tiny/checkpoint_")
    names = {os.path.basename(p) for p in fs.ls(result["checkpoint"])}
    assert {
        "meta.json",
        "tp00000-of-00002.sae.safetensors",
        "tp00001-of-00002.sae.safetensors",
        "tp00000-of-00002.state.safetensors",
        "tp00001-of-00002.state.safetensors",
    } <= names
    sae, _ = load_sae(f"{bucket}/out/sae", storage_options=options)
    assert sae.cfg.n_latents == 1024


def test_train_job_rejects_bad_config(tmp_path, small_cache):
    env = dict(os.environ, SAESCALE_RUNS=str(tmp_path))
    cases = {
        "sae.k=0": "sae.k must be a positive integer",
        "parallel.workers=3": "worker count (3) must be a positive multiple of parallel.tp=2",
        "sae.n_latents=1000 parallel.tp=16 parallel.workers=16": "not divisible by parallel.tp=16",
        "train.batch_size=100 parallel.workers=8 parallel.tp=2": "batch_size=100 must be divisible",
        "sae.n_latents=67108864 parallel.memory_per_worker_gib=8": "raise tp",
    }
    procs = {  # all at once: each is mostly interpreter start-up and imports
        override: subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "jobs", "train.py"), f"data.cache={small_cache}", *override.split()],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for override in cases
    }
    for override, proc in procs.items():
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 2, (override, stderr[-2000:])
        assert cases[override] in stderr, (override, stderr[-2000:])


def test_workers_fit_beside_the_reads_or_the_job_refuses():
    """A joined cluster too small for the workers plus one read task: the workers' CPU requests
    shrink to leave the reads one (else Ray Data waits forever); one with no room for a read
    task is refused with the CPUs needed and found; a big enough one, or one with no CPUs yet
    (an autoscaler's head), is left alone."""
    from saescale.service.ray_train import ClusterTooSmall, LaunchSpec, fit_to_cluster

    spec = LaunchSpec(
        "r", "/tmp/x", None, workers=2, tp=2, cpus_per_worker=1, use_gpu=False, max_failures=0, worker_config={}
    )
    assert fit_to_cluster(spec, 3) is spec and fit_to_cluster(spec, 64) is spec and fit_to_cluster(spec, 0) is spec
    assert fit_to_cluster(spec, 2).cpus_per_worker == 0.5
    assert fit_to_cluster(spec, 2.5).cpus_per_worker == 0.75
    odd = fit_to_cluster(LaunchSpec(**{**vars(spec), "workers": 3}), 2)
    assert odd.cpus_per_worker * 3 + 1 <= 2
    many = LaunchSpec(**{**vars(spec), "workers": 256})  # a share under 0.01 CPU each: refused, not 0-CPU workers
    with pytest.raises(ClusterTooSmall, match=r"needs 257 CPUs .* at the least 3.56"):
        fit_to_cluster(many, 3)
    with pytest.raises(
        ClusterTooSmall, match=r"needs 3 CPUs .*2 workers x parallel.cpus_per_worker=1.* the cluster has 1:"
    ):
        fit_to_cluster(spec, 1)


def test_cache_job_rejects_unknown_model(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "jobs", "cache.py"),
            "model=no/such-model-here",
            f"output={tmp_path / 'c'}",
            "use_ray=false",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 2
    assert "cannot load model 'no/such-model-here'" in proc.stderr
    assert not (tmp_path / "c").exists()
