"""A damaged training shard stops `python jobs/train.py` with one line, not a trained-on-garbage SAE.

Through the real job (embedded local Ray, Ray Data stream, Ray Train workers) on a copy of the
real small cache: one training shard, not the held-out shard 0 and not the shard the workers read
for the initialisation sample, gets 16 bytes flipped in its middle. The run must exit non-zero
with a single `error:` line naming that shard and how to rebuild it, print no Python traceback of
its own, spend no worker-group restart on it, and write no result.json.

Both kinds of damage (16 flipped bytes, a lost second half) are also read through the job's own
Ray Data stream (`service.stream.make_datasets`) on a local Ray: each must fail the read with the
one line the job prints. The two kinds take the same path from the read task to the driver's
line, so one whole Ray Train job (about 40 s) covers that path for both.
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


def damaged_copy(small_cache: str, where, how: str) -> tuple[str, dict]:
    """A copy of the cache at `where` with shard DAMAGED damaged `how`; returns (its file, manifest)."""
    shutil.copytree(small_cache, where)
    manifest = json.loads((where / "manifest.json").read_text())
    shard = manifest["shards"][DAMAGED]["file"]
    damage(str(where / shard), how)
    return shard, manifest


def assert_names_shard_and_remedy(line: str, cache, shard: str, how: str) -> None:
    assert os.path.basename(shard) in line and str(cache) in line, line
    assert ("checksum mismatch" if how == "flip" else "truncated") in line, line
    assert "python jobs/cache.py" in line and f"output={cache}" in line, line  # the remedy, runnable as printed


@pytest.mark.slow
def test_damaged_training_shard_stops_the_job_in_one_line(tmp_path, small_cache):
    how = "flip"
    cache = tmp_path / "cache"
    shard, _ = damaged_copy(small_cache, cache, how)

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
    assert_names_shard_and_remedy(errors[0], cache, shard, how)
    assert not list(tmp_path.rglob("result.json"))  # wherever this run's output folder is
    assert "[FailurePolicy] RETRY" not in proc.stdout + proc.stderr  # no worker-group restart was spent on it


def training_plan(cache: str, manifest: dict, batch_size: int, epochs: int, seed: int):
    """(filesystem, the job's `DataPlan` over the cache's training shards, in 2 streams)."""
    from saescale.service.stream import arrow_filesystem, plan_data

    train = manifest["shards"][1:]  # shard 0 is held out, as in the job
    filesystem, root = arrow_filesystem(cache, None)
    plan = plan_data(
        [f"{root}/{s['file']}" for s in train],
        [s["rows"] for s in train],
        batch_size=batch_size,
        streams=2,
        epochs=epochs,
        seed=seed,
        sha256=[s["sha256"] for s in train],
        sizes=[s["bytes"] for s in train],
    )
    return filesystem, plan


@pytest.fixture(scope="module")
def local_ray():
    """An embedded local Ray in this process, as the job starts it (`ensure_ray`), for the
    stream tests below; its own short temp dir (Ray's socket paths must stay short)."""
    import ray

    from saescale.service.ray_local import ensure_ray

    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = ray_tmp
    try:
        assert ensure_ray(num_cpus=2) is not None, "this process was connected to a Ray already"
        yield
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_damaged_shard_fails_the_ray_data_stream_with_the_jobs_line(tmp_path, small_cache, local_ray, how):
    """The job's stream of every training shard, read by Ray Data tasks: the damaged shard's read
    fails with the CorruptShardError the job reports (`first_cause` finds it behind Ray's
    wrappers), and the driver's line names the shard, the kind of damage and the rebuild."""
    from saescale.data.format import CorruptShardError
    from saescale.service.failures import first_cause
    from saescale.service.stream import (
        corrupt_shard_line,
        make_datasets,
        rebuild_hint,
    )

    cache = tmp_path / "cache"
    shard, manifest = damaged_copy(small_cache, cache, how)
    filesystem, plan = training_plan(str(cache), manifest, batch_size=256, epochs=1, seed=0)
    remedy = rebuild_hint(str(cache), manifest["build_config"])
    streams = make_datasets(plan, filesystem, with_ids=False, cache_url=str(cache), remedy=remedy)
    with pytest.raises(Exception) as failed:  # Ray's wrapper of the read task's error
        for stream in streams.values():  # the damaged shard is in one of them
            stream.materialize()
    cause = first_cause([failed.value])
    assert type(cause) is CorruptShardError, repr(failed.value)[-3000:]
    line = corrupt_shard_line(cause, str(cache), remedy)
    assert "\n" not in line
    assert_names_shard_and_remedy(line, cache, shard, how)


def test_a_stream_started_at_any_block_gives_the_whole_streams_steps_from_there(small_cache, local_ray):
    """What a restarted rank reads: the Ray Data stream built from the block that holds its step,
    shuffled per block, gives exactly the steps the whole stream gives from that step on (across
    epochs and shards cut mid-way), and the whole stream's rows are its pieces' in order (a union
    of per-epoch reads interleaved them, so a stream started mid-run took other rows)."""
    import pyarrow.parquet as pq
    import torch

    from saescale.data.blocks import block_steps, resume_block
    from saescale.data.format import POS_STRIDE
    from saescale.service.stream import make_collate, make_datasets, stream_steps

    with open(os.path.join(small_cache, "manifest.json")) as handle:
        manifest = json.load(handle)
    filesystem, plan = training_plan(small_cache, manifest, batch_size=96, epochs=3, seed=4)
    per_block = block_steps(plan.stream_batch, 200)  # 5 steps of 48 rows a block
    collate = make_collate(manifest["dtype"], manifest["d_model"], with_ids=True)

    def steps(stream: int, start_step: int) -> list:
        first, skip = resume_block(start_step, per_block)
        (dataset,) = make_datasets(
            plan, filesystem, True, small_cache, "", [stream], first * per_block * plan.stream_batch,
            plan.total_steps * plan.stream_batch,
        ).values()  # fmt: skip
        blocks = dataset.iter_torch_batches(batch_size=per_block * plan.stream_batch, collate_fn=collate)
        return [ids for ids in (s[1] for s in stream_steps(blocks, 4, stream, first, True, plan.stream_batch))][skip:]

    def shard_ids(path: str):
        table = pq.read_table(path, columns=["window", "pos"])
        return table.column("window").to_numpy().astype("int64") * POS_STRIDE + table.column("pos").to_numpy()

    for stream in range(2):
        whole = steps(stream, 0)
        assert len(whole) == plan.total_steps
        expected = [i for read in plan.stream_reads(stream) for p in read for i in shard_ids(p.path)[p.start : p.stop]]
        got = sorted(
            i for block in range(0, len(whole), per_block) for s in whole[block : block + per_block] for i in s.tolist()
        )
        assert got == sorted(expected[: len(got)])  # every row of the run's steps, once
        first_block = torch.cat(whole[:per_block]).tolist()
        assert sorted(first_block) == sorted(expected[: len(first_block)])  # block 0: the stream's first rows
        for start in (1, 7, plan.total_steps // 3 + 2, plan.total_steps - 1):
            resumed = steps(stream, start)
            assert len(resumed) == plan.total_steps - start
            assert all(torch.equal(a, b) for a, b in zip(resumed, whole[start:])), (stream, start)
