"""The Ray training job through object-storage faults: the cache is read from, and checkpoints
are written to, a real S3 server (moto) on loopback behind the fault proxy
(`saescale.bench.fault_proxy`). One uninterrupted run is the reference; each run with faults is
the same command (its own run_id) and must end with the same steps, tokens and bit-identical
SAE, or, when storage stays down, stop with one line and resume identically once it is back.

Fault schedules (`RANK1_STATE` is rank 1's optimizer-state upload, the last file of a checkpoint
to start: the third one is the step-6 checkpoint's):
- 503 SlowDown on 20% of all requests for the whole run, and 20 s of refused connections
  starting halfway through the reference run's request count;
- resets of rank 1's step-6 upload and of every listing of the run's storage, with
  `storage.retry_s=8`, until the job says its restart waits for storage: the upload gives up,
  and the worker-group restart waits for storage before it starts;
- refused connections from rank 1's step-6 upload until the test ends them, `storage.retry_s=4`.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from saescale.formats.saved import load_sae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, BATCH = 8, 256
RANK1_STATE = r"^PUT \S*/tp00001-of-00002\.state\.safetensors"
STEP6_CHECKPOINT = 3  # the third checkpoint upload (steps 2, 4, 6)
pytestmark = pytest.mark.slow


JOB = [
    "data.heldout_tokens=512",
    "sae.n_latents=1024",
    "sae.k=16",
    f"train.batch_size={BATCH}",
    f"train.max_steps={STEPS}",
    "train.log_every=2",
    "train.checkpoint_every=2",
    "data.shuffle_buffer_rows=512",
    "export.saelens=false",
    "export.sparsify=false",
    "export.evaluate=false",
]


@pytest.fixture(scope="module")
def stage(tmp_path_factory, small_cache, s3_endpoint):
    """The cache in a bucket on moto, the fault proxy in front (`saescale bench soak`'s stage)."""
    from saescale.bench.soak import Stage

    stage = Stage.create(s3_endpoint, small_cache, tmp_path_factory.mktemp("outage-runs"), Path(ROOT))
    try:
        yield stage
    finally:
        stage.close()


def run(stage, run_id: str, *overrides: str) -> tuple[int, str, float]:
    return stage.run(run_id, [*JOB, *overrides], timeout=600)


@pytest.fixture(scope="module")
def reference(stage):
    """The uninterrupted run: (its request count through the proxy, wall seconds)."""
    before = stage.proxy.counts["forwarded"]
    code, log, seconds = run(stage, "plain")
    assert code == 0, log[-4000:]
    assert stage.result("plain")["steps"] == STEPS
    return stage.proxy.counts["forwarded"] - before, seconds


def assert_same_as_reference(stage, run_id: str) -> None:
    from saescale.bench.soak import compare

    plain, other = stage.result("plain"), stage.result(run_id)
    assert other["steps"] == plain["steps"] == STEPS and other["tokens"] == plain["tokens"] == STEPS * BATCH
    assert compare(stage, "plain", run_id)["identical"]


def retry_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "[saescale] storage:" in line and "retrying in" in line]


def test_a_20_s_outage_amid_503s_on_a_fifth_of_requests_is_waited_out(stage, reference):
    """503 SlowDown on a random 20% of all requests for the whole run and, halfway through the
    reference run's request count, 20 s of refused connections: waited out (one line per retry,
    no restart), and the run ends as the reference did."""
    requests, plain_s = reference
    outages = stage.proxy.counts["outages"]
    stage.proxy.fail_matching(".", "503", fraction=0.2)
    stage.proxy.outage_after(requests // 2, 20.0, "down")
    try:
        code, log, seconds = run(stage, "faulted")
    finally:
        stage.proxy.stop_fault()
    assert code == 0, log[-4000:]
    assert stage.proxy.counts["outages"] == outages + 1 and retry_lines(log), log[-4000:]
    # about 94 requests a run; the S3 client's own retries absorb most 503s, saescale's the rest
    assert stage.proxy.counts["503"] >= 5, stage.proxy.counts
    assert "Traceback" not in log and "RETRY" not in log, log[-4000:]
    print(f"wall time: {plain_s:.1f} s uninterrupted, {seconds:.1f} s with 503s and the 20 s outage")
    assert_same_as_reference(stage, "faulted")


def checkpoint_folders(stage, run_id: str) -> tuple[dict[str, set[str]], dict]:
    """({checkpoint folder URL: its file names}, Ray Train's checkpoint registry) of a run in
    the bucket (read around the proxy)."""
    import s3fs

    fs = s3fs.S3FileSystem(**stage.storage_options)
    root = f"{stage.bucket}/runs/{run_id}"
    folders = {
        f"s3://{path}": {os.path.basename(f) for f in fs.ls(path)}
        for path in fs.ls(root)
        if os.path.basename(path).startswith("checkpoint_") and fs.isdir(path)
    }
    return folders, json.loads(fs.cat_file(f"{root}/checkpoint_manager_snapshot.json"))


COMPLETE = {f"tp0000{r}-of-00002.{kind}.safetensors" for r in (0, 1) for kind in ("sae", "state")} | {"meta.json"}


def test_a_restart_after_the_budget_waits_for_storage_then_resumes(stage, reference):
    """From rank 1's step-6 upload on, that file's uploads and every listing of the run's
    storage are reset (the rest of storage answers, Ray Train's checkpoint registry included):
    the upload gives up after `storage.retry_s=8`, the worker fails, and the controller waits for
    the run's storage to answer before the restart spends one of `ray.max_failures`. The test
    lets storage answer once the job says it waits; the new workers then resume from the step-4
    checkpoint: the half-written step-6 one is neither registered nor loaded."""
    stage.proxy.fail_matching(rf"{RANK1_STATE}|[?&]prefix=runs", "reset", start_on=RANK1_STATE, nth=STEP6_CHECKPOINT)
    proc = stage.start("restart", [*JOB, "storage.retry_s=8"])
    seen, waiting, probed = [], None, False
    try:
        for line in proc.stdout:  # until the controller says it waits (or the job ends)
            seen.append(line)
            if "before restarting the workers" in line:
                waiting = stage.proxy.counts["selective"]
                # storage answers once the wait's own probe was refused (the upload gave up before)
                probed = stage.proxy.wait_selective(waiting, timeout=60)
                break
    finally:
        stage.proxy.stop_fault()
    rest, _ = proc.communicate(timeout=600)
    log = "".join(seen) + rest
    assert proc.returncode == 0, log[-4000:]
    assert waiting is not None
    assert re.search(r"waiting up to 8 s for s3://\S+/runs and s3://\S+/cache to answer before restarting", log), log
    assert probed, stage.proxy.counts  # while the job waited, its storage was refused, and it went on waiting
    assert "answers again; restarting the workers" in rest, log[-4000:]
    assert "resumed from the step-4 checkpoint" in rest and "resumed from the step-6" not in log, log[-4000:]
    assert_same_as_reference(stage, "restart")


def test_storage_gone_for_good_stops_with_one_line_then_a_rerun_resumes(stage, reference, tmp_path):
    """Storage refuses every connection from rank 1's step-6 upload on, with `storage.retry_s=4`:
    the run stops with one line naming the storage, within the upload's budget plus the
    restart's wait (and Ray's slack), exit 1; the last registered checkpoint (step 4, or step 2
    when the outage also cut Ray Train's registration of step 4) is intact and loads, the cut
    step-6 one is not registered; once storage is back, the same command resumes from the
    registered one and ends as the reference did."""
    from saescale.train.checkpoint import export_gathered

    stage.proxy.outage_on(RANK1_STATE, None, "down", nth=STEP6_CHECKPOINT)
    seen, stopped = [], None
    try:
        proc = stage.start("gone", [*JOB, "storage.retry_s=4"])
        for line in proc.stdout:  # when the one line comes (the process may take longer to exit)
            seen.append(line)
            if line.startswith("error:") and stopped is None:
                stopped = time.monotonic() - stage.proxy.outage_started
        proc.wait(timeout=600)
    finally:
        stage.proxy.stop_fault()
    code, log = proc.returncode, "".join(seen)
    assert code == 1 and stopped is not None, log[-4000:]
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, log[-4000:]
    # the worker's upload or Ray Train's own state write after it: whichever outlasted the budget
    assert re.search(r"^error: storage s3://soak-\w+/runs is unreachable: \w+ s3://soak-\w+/runs/gone/", errors[0])
    assert "storage.retry_s=4" in errors[0] and "rerun the same command" in errors[0], errors[0]
    print(f"stopped {stopped:.1f} s after the outage began (storage.retry_s=4)")
    assert stopped < 2 * 4 + 30, stopped  # the upload's budget, the restart's wait, Ray's slack
    folders, registry = checkpoint_folders(stage, "gone")
    registered = registry["latest_checkpoint_result"]
    step = registered["metrics"]["step"]  # 4, or 2 when the outage cut step 4's registration
    latest = next(url for url in folders if url.endswith("/" + registered["checkpoint_dir_name"]))
    assert step in (2, 4) and folders[latest] >= COMPLETE, (registered, folders)
    cut = [url for url, names in folders.items() if not names >= COMPLETE]
    assert len(cut) == 1 and cut[0] > latest, folders  # the step-6 upload, never registered
    export_gathered(latest, str(tmp_path / "last"), {}, stage.storage_options)
    assert load_sae(str(tmp_path / "last"))[0].cfg.n_latents == 1024

    code, log, _ = run(stage, "gone", "storage.retry_s=4")
    assert code == 0, log[-4000:]
    assert f"resumed from the step-{step} checkpoint" in log, log[-4000:]
    assert_same_as_reference(stage, "gone")
