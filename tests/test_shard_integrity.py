"""A damaged training shard stops `python jobs/train.py` with one line, not a trained-on-garbage SAE.

Through the real job (embedded local Ray, Ray Data stream, Ray Train workers) on a copy of the
real small cache: one training shard, not the held-out shard 0 and not the shard the workers read
for the initialisation sample, gets 16 bytes flipped in its middle, or loses its second half.
The run must exit non-zero with a single `error:` line naming that shard and how to rebuild it,
print no Python traceback of its own, spend no worker-group restart on it, and write no result.json.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAMAGED = 3  # shard 0 is held out; shard 1 (the first training shard) seeds the initialisation
# a log line Ray forwarded from one of its processes: "(RayTrainWorker pid=12) ...", maybe coloured
FORWARDED = re.compile(r"^(\x1b\[\d+m)?\((raylet|[\w.:-]+ pid=\d+)")


def damage(path: str, how: str) -> None:
    with open(path, "rb") as handle:
        data = bytearray(handle.read())
    if how == "flip":
        middle = len(data) // 2
        data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    else:
        data = data[: len(data) // 2]
    with open(path, "wb") as handle:
        handle.write(data)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_damaged_training_shard_stops_the_job_in_one_line(tmp_path, small_cache, how):
    cache = tmp_path / "cache"
    shutil.copytree(small_cache, cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    shard = manifest["shards"][DAMAGED]["file"]
    damage(str(cache / shard), how)

    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's socket paths must stay short
    env = dict(os.environ, SAESCALE_RUNS=str(tmp_path), WANDB_MODE="offline", RAY_DEDUP_LOGS="0", RAY_TMPDIR=ray_tmp)
    env.pop("RAY_ADDRESS", None)
    cmd = [
        sys.executable,
        os.path.join(ROOT, "jobs", "train.py"),
        "run_id=damaged",
        f"data.cache={cache}",
        "sae.n_latents=1024",
        "sae.k=16",
        "train.batch_size=256",
        "train.epochs=1",
        "train.checkpoint_every=100",
        "data.shuffle_buffer_rows=512",
        "export.saelens=false",
        "export.sparsify=false",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    log = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode not in (0, None), log
    # the driver's own lines; Ray also forwards its actors' logs, tracebacks included ("(Name pid=N) ...")
    driver = [line for line in proc.stderr.splitlines() if not FORWARDED.match(line)]
    assert not any("Traceback" in line for line in driver), log
    errors = [line for line in driver if line.startswith("error:")]
    assert len(errors) == 1, log
    line = errors[0]
    assert os.path.basename(shard) in line and str(cache) in line, line
    assert ("checksum mismatch" if how == "flip" else "truncated") in line, line
    assert "python jobs/cache.py" in line and f"output={cache}" in line, line  # the remedy, runnable as printed
    assert not list(tmp_path.rglob("result.json"))  # wherever this run's output folder is
    assert "[FailurePolicy] RETRY" not in proc.stdout + proc.stderr  # no worker-group restart was spent on it
