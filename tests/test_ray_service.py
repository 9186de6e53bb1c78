"""How the jobs find and use Ray, as a new user meets it: the embedded default beside a running
`ray start --head`, a console without Ray's own chatter (but with its errors, and with its log
files kept), and the paths a job submitted with `--working-dir` may read and write."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import pytest

from helpers import start_ray_head, stop_ray_started_in
from saescale.app.job_paths import JobPathError, check_job_paths, working_dir_package

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
PACKAGE = "/tmp/rt/ray/session_2026-01-01_00-00-00_1_2/runtime_resources/working_dir_files/_ray_pkg_0123abcd"


def test_a_job_in_rays_working_dir_copy_is_told_which_paths_to_pass():
    # the signal: the working directory is inside Ray's unpacked working_dir packages ...
    assert working_dir_package(PACKAGE + "/jobs", environ={}) == PACKAGE
    # ... or the job config Ray hands the entrypoint names an uploaded working_dir
    config = '{"runtime_env": {"working_dir": "gcs://_ray_pkg_0123abcd.zip"}, "metadata": {}}'
    assert working_dir_package(ROOT, environ={"RAY_JOB_CONFIG_JSON_ENV_VAR": config}) == os.path.realpath(ROOT)
    in_place = '{"runtime_env": {"working_dir": "local:///srv/app"}}'
    assert working_dir_package(ROOT, environ={"RAY_JOB_CONFIG_JSON_ENV_VAR": in_place}) is None
    assert working_dir_package(ROOT, environ={}) is None

    with pytest.raises(JobPathError) as err:
        check_job_paths(
            reads={"data.cache": "runs/cache/smollm2-resid8"},
            writes={"output_dir": "s3://bucket/out", "storage.url": "file://runs/ray"},
            package=PACKAGE,
        )
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("data.cache=runs/cache/smollm2-resid8, storage.url=file://runs/ray are relative paths")
    assert (
        "pass data.cache=$PWD/runs/cache/smollm2-resid8 storage.url=$PWD/runs/ray on a one-machine cluster" in message
    )
    assert "s3://" in message and "output_dir" not in message
    with pytest.raises(JobPathError, match=r"sae=/tmp/rt/ray/session_.*/x lies in Ray's session directory"):
        check_job_paths(reads={"sae": PACKAGE + "/x"}, package=PACKAGE)
    # absolute paths outside Ray's files and shared URLs pass; so does anything outside a package
    check_job_paths(reads={"data.cache": "/data/cache"}, writes={"output": "s3://bucket/c"}, package=PACKAGE)
    check_job_paths(reads={"data.cache": "runs/cache"}, writes={"output": "runs/x"}, package=None)


def _ray_env(ray_tmp: str, **extra: str) -> dict[str, str]:
    env = dict(
        os.environ,
        RAY_TMPDIR=ray_tmp,
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        PATH=f"{BIN}:{os.environ['PATH']}",
        **extra,
    )
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.mark.slow
def test_embedded_ray_beside_a_running_head_with_a_quiet_console(tmp_path, small_cache):
    """The README's `ray start --head` is running (its address in Ray's current-cluster file), and
    `python jobs/train.py` with no address must start its own Ray, say so, and train. Its console
    has the progress bars and the summary but not Ray's own noise (the placement-group cleaner's
    State API warning every second, Ray Data's per-epoch execution blocks); a worker killed
    mid-run still shows its error lines, and Ray's log files keep everything."""
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # Ray's socket paths must stay short
    env = _ray_env(ray_tmp, SAESCALE_RUNS=str(tmp_path), WANDB_MODE="offline", RAY_DEDUP_LOGS="0")
    head_gcs, _ = start_ray_head(env)
    try:
        with open(os.path.join(ray_tmp, "ray", "ray_current_cluster")) as current:
            assert head_gcs.split(":")[1] in current.read()  # where a bare ray.init() would go
        proc = subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "jobs", "train.py"),
                "run_id=quiet",
                f"data.cache={small_cache}",
                "data.heldout_tokens=512",
                "sae.n_latents=1024",
                "sae.k=16",
                "train.batch_size=256",
                "train.log_every=2",
                "train.checkpoint_every=2",
                "train.max_steps=4",
                "data.shuffle_buffer_rows=512",
                "export.saelens=false",
                "export.sparsify=false",
                "fault.rank=1",
                "fault.step=3",
                "ray.max_failures=1",
            ],
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
            cwd=ROOT,
        )
    finally:
        stop_ray_started_in(ray_tmp)  # the head and anything the job left: not `ray stop`, which stops every Ray
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-4000:]
    assert "num_cpus and num_gpus must not be provided" not in console
    started = [line for line in console.splitlines() if line.startswith("[saescale] Ray: ")]
    assert len(started) == 1 and "started an embedded local Ray" in started[0], started
    # the worker SIGKILLed at step 3: Ray's error lines still reach the console, and the run restarts
    assert "A worker died or was killed" in console or "ActorDiedError" in console, console[-4000:]
    assert "[FailurePolicy] RETRY" in console, console[-4000:]
    assert "4/4" in console and '"steps": 4' in console  # the progress bar and the summary
    for noise in (
        "PlacementGroupCleaner",
        "State API",
        "Starting execution of Dataset",
        "Execution plan of Dataset",
        "execution finished in",
        "Progress bars disabled",
        "Estimated parquet",
    ):
        assert noise not in console, (noise, console[-4000:])
    # ... all of it is still in the embedded Ray's log files
    logs = re.search(r"logs in (\S+/logs)\)", started[0]).group(1)
    assert logs.startswith(ray_tmp) and os.path.isdir(logs)
    with open(os.path.join(logs, "ray-data", "ray-data.log")) as handle:
        data_log = handle.read()
    assert "Execution plan of Dataset" in data_log and "execution finished in" in data_log
    assert any(name.startswith("worker-") and name.endswith(".err") for name in os.listdir(logs))
    assert os.path.exists(os.path.join(logs, "raylet.out"))
