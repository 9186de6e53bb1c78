"""`data.source=model` through the real training job: LM actors (a tiny Llama with SmolLM2's
tokenizer, a real transformer) on Ray Data feeding two Ray Train workers (tp=2), on Shakespeare.

One uninterrupted run (writing its activations through to a cache), one whose training worker is
SIGKILLed mid-stream, one whose LM actor is SIGKILLed mid-stream: the same steps, the same
ordered rows (window, position) and the same final SAE, bit for bit. The written cache passes
the cache checks; bad input stops before Ray with one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import rows_trained, wait_for, wait_registered
from saescale.data.reader import ActivationCache
from saescale.formats.saved import load_sae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def args(model: str, *overrides: str) -> list[str]:
    base = [
        "run_id=streamed",
        "data.source=model",
        f"data.lm.model={model}",
        "data.lm.layer=1",
        "data.lm.max_tokens=12000",
        "data.lm.rows_per_shard=2048",
        "data.lm.windows_per_batch=8",
        "data.heldout_tokens=512",
        "data.shuffle_buffer_rows=512",
        "sae.n_latents=512",
        "sae.k=16",
        "train.batch_size=256",
        "train.epochs=1",
        "train.lr_rule=paper",
        "train.checkpoint_every=8",
        "train.log_every=4",
        "debug.record_rows=true",
        "wandb.mode=disabled",
    ]
    keys = {o.split("=", 1)[0] for o in overrides}
    return [a for a in base if a.split("=", 1)[0] not in keys] + list(overrides)


def start(runs, model, *overrides) -> subprocess.Popen:
    env = dict(os.environ, SAESCALE_RUNS=str(runs), RAY_DEDUP_LOGS="0")
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, os.path.join(ROOT, "jobs", "train.py"), *args(model, *overrides)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)


def run(runs, model, *overrides, expect: int = 0) -> str:
    proc = start(runs, model, *overrides)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == expect, out[-4000:]
    return out


def run_killing_a_worker(runs, model) -> str:
    """Rank 1 SIGKILLed at step 20, once the step-16 checkpoint is registered (Ray registers a
    reported checkpoint at its controller's next poll: rank 0 holds after step 18 until then)."""
    proc = start(runs, model, "fault.rank=1", "fault.step=20", "fault.hold_steps=[18]")
    try:
        wait_for(runs / "streamed" / "held-18", proc)
        wait_registered(runs / "ray" / "streamed", 16, proc)
        (runs / "streamed" / "release-18").write_text("")
        out, _ = proc.communicate(timeout=900)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """{"plain", "worker_killed", "actor_killed"}: (run folder, log), each its own runs root."""
    root = tmp_path_factory.mktemp("model-stream")
    out = {}
    written = root / "written-cache"
    out["plain"] = (root / "plain" / "streamed", run(root / "plain", tiny_model_dir, f"data.cache_write={written}"))
    log = run_killing_a_worker(root / "worker_killed", tiny_model_dir)
    out["worker_killed"] = (root / "worker_killed" / "streamed", log)
    log = run(root / "actor_killed", tiny_model_dir, "fault.lm_actor_block=3")
    out["actor_killed"] = (root / "actor_killed" / "streamed", log)
    out["written"] = written
    return out


def ordered_hash(folder) -> tuple[int, int, str]:
    """(steps, distinct windows, sha256 of every step's row ids in order) of a run's record."""
    steps = rows_trained(folder / "rows")
    ordered = [steps[s] for s in sorted(steps)]
    windows = {i >> 16 for ids in ordered for i in ids}
    return len(ordered), len(windows), hashlib.sha256(json.dumps(ordered).encode()).hexdigest()


@pytest.mark.slow
def test_a_killed_worker_or_lm_actor_resumes_the_stream_exactly(runs):
    plain, _ = runs["plain"]
    result = json.loads((plain / "result.json").read_text())
    assert result["source"] == "model" and result["steps"] == 47  # 12033 rows // 256
    assert result["heldout"]["after_tokens"] == 12000 and result["heldout"]["rows"] >= 512
    expected = ordered_hash(plain)
    assert expected[0] == 47 and expected[1] > 100
    reference = load_sae(str(plain / "sae"))[0].state_dict()
    for name in ("worker_killed", "actor_killed"):
        folder, log = runs[name]
        assert (folder / (".fault-injected" + ("-lm-actor" if name == "actor_killed" else ""))).exists()
        assert ordered_hash(folder) == expected, name
        got = load_sae(str(folder / "sae"))[0].state_dict()
        assert all(torch.equal(got[k], reference[k]) for k in reference), name
        assert json.loads((folder / "result.json").read_text())["heldout_nmse"] == result["heldout_nmse"]
    assert "resumed from the step-16 checkpoint" in runs["worker_killed"][1]


@pytest.mark.slow
def test_the_written_through_cache_is_a_checked_cache(runs):
    """(That it is the cache builder's, byte for byte: tests/test_model_stream.py; a run from it:
    bench/stream_vs_cache.sh.)"""
    written = runs["written"]
    cache = ActivationCache(str(written))
    assert not (written / "_work").exists()
    assert sum(s.rows for s in cache.manifest.shards) == cache.manifest.n_rows >= 12000
    for s in range(len(cache.manifest.shards)):  # every shard against the manifest's sha256
        assert cache.read_shard(s).shape[1] == 48
    assert cache.manifest.build_config["max_tokens"] == 12000 and cache.manifest.d_model == 48


@pytest.mark.slow
def test_bad_lm_input_stops_before_ray_with_one_line(tiny_model_dir, tmp_path):
    out = run(tmp_path, tiny_model_dir, "data.lm.layer=7", expect=2)
    assert "layer 7 is out of range: the model has layers 0..2" in out
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "a.txt").write_text("Too short for one window.")
    out = run(tmp_path, tiny_model_dir, f"data.lm.corpus={tmp_path / 'short'}", expect=2)
    assert "produced no tokens" in out
    assert "Traceback" not in out and "Started a local Ray" not in out
    # one long document: the budget takes its start, and no document is left for the held-out
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.txt").write_text("To be, or not to be, that is the question. " * 400)
    out = run(tmp_path, tiny_model_dir, f"data.lm.corpus={tmp_path / 'one'}", "data.lm.max_tokens=1000", expect=2)
    assert "the held-out slice is empty" in out and "data.lm.max_tokens=1000" in out, out[-2000:]
