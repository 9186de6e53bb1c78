"""The Hydra training job end to end on the embedded default (real SmolLM2, real Shakespeare,
real wandb offline), including resume of a rerun with the same run name."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_job(tmp_path, *overrides):
    env = dict(os.environ, SAESCALE_RUNS=str(tmp_path), WANDB_MODE="offline")
    cmd = [sys.executable, os.path.join(ROOT, "jobs", "train.py"), "run_name=tiny",
           "data.train_tokens=3072", "data.heldout_tokens=512", "sae.n_latents=1024", "sae.k=16",
           "train.batch_size=256", "train.log_every=2", "train.checkpoint_every=4", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_train_job_writes_sae_exports_metrics_and_resumes(tmp_path):
    run_job(tmp_path, "train.epochs=1")
    out = tmp_path / "tiny"
    first = json.loads((out / "result.json").read_text())
    assert first["steps"] == 12 and first["tokens"] == 12 * 256
    assert 0 < first["heldout_nmse"] < 1.0
    for rel in ("sae/sae.safetensors", "sae/cfg.json", "export/saelens/sae_weights.safetensors",
                "export/sparsify/sae.safetensors", "checkpoints/latest.json", "metrics.jsonl"):
        assert (out / rel).exists(), rel
    wandb_runs = list((out / "wandb" / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1 and list(wandb_runs[0].glob("*.wandb"))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("dead_fraction" in m for m in metrics)

    # same run name, more epochs: resumes from the last checkpoint instead of starting over
    proc = run_job(tmp_path, "train.epochs=2")
    assert "resuming tiny from step 12" in proc.stdout
    second = json.loads((out / "result.json").read_text())
    assert second["steps"] == 24 and second["tokens"] == 24 * 256


def test_train_job_rejects_bad_config(tmp_path):
    env = dict(os.environ, SAESCALE_RUNS=str(tmp_path))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "train.py"), "sae.k=0"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode != 0
    assert "sae.k must be a positive integer" in proc.stderr
