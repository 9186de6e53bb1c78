"""The Hydra training job end to end on the embedded default (real SmolLM2, real Shakespeare,
real wandb offline), including resume of a rerun with the same run name."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    """A real cache of the embedded default through the cache job's command line (no Ray)."""
    out = tmp_path_factory.mktemp("cache") / "smol"
    cmd = [sys.executable, os.path.join(ROOT, "jobs", "cache.py"), f"output={out}", "use_ray=false",
           "max_tokens=4096", "rows_per_shard=1024"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cache ready: 4" in proc.stdout
    return str(out)


def run_job(tmp_path, cache, *overrides):
    env = dict(os.environ, SAESCALE_RUNS=str(tmp_path), WANDB_MODE="offline")
    cmd = [sys.executable, os.path.join(ROOT, "jobs", "train.py"), "run_name=tiny", f"data.cache={cache}",
           "data.heldout_tokens=512", "sae.n_latents=1024", "sae.k=16",
           "train.batch_size=256", "train.log_every=2", "train.checkpoint_every=4", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_train_job_writes_sae_exports_metrics_and_resumes(tmp_path, small_cache):
    run_job(tmp_path, small_cache, "train.epochs=1")
    out = tmp_path / "tiny"
    first = json.loads((out / "result.json").read_text())
    manifest = json.loads(open(os.path.join(small_cache, "manifest.json")).read())
    train_rows = sum(s["rows"] for s in manifest["shards"][1:])  # shard 0 is held out
    assert first["steps"] == train_rows // 256 and first["tokens"] == first["steps"] * 256
    assert 0 < first["heldout_nmse"] < 1.0
    for rel in ("sae/sae.safetensors", "sae/cfg.json", "export/saelens/sae_weights.safetensors",
                "export/sparsify/sae.safetensors", "checkpoints/latest.json", "metrics.jsonl"):
        assert (out / rel).exists(), rel
    wandb_runs = list((out / "wandb").glob("offline-run-*"))  # the path the README gives
    assert len(wandb_runs) == 1 and list(wandb_runs[0].glob("*.wandb"))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("dead_fraction" in m for m in metrics)

    # same run name, more epochs: resumes from the last checkpoint instead of starting over
    proc = run_job(tmp_path, small_cache, "train.epochs=2")
    assert f"resuming tiny from step {first['steps']}" in proc.stdout
    second = json.loads((out / "result.json").read_text())
    assert second["steps"] == 2 * first["steps"] and second["tokens"] == 2 * first["tokens"]


def test_train_job_rejects_bad_config(tmp_path, small_cache):
    env = dict(os.environ, SAESCALE_RUNS=str(tmp_path))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "train.py"), f"data.cache={small_cache}", "sae.k=0"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode != 0
    assert "sae.k must be a positive integer" in proc.stderr


def test_cache_job_rejects_unknown_model(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "cache.py"), "model=no/such-model-here",
                           f"output={tmp_path / 'c'}", "use_ray=false"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2
    assert "cannot load model 'no/such-model-here'" in proc.stderr
    assert not (tmp_path / "c").exists()
