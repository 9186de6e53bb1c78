"""Storage calls wait out transient faults and fail at once on permanent ones: a real S3 server
(moto) behind the fault-injecting proxy, through s3fs."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time

import pytest
import s3fs

from saescale import retry, storage
from saescale.bench.fault_proxy import FaultProxy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# s3fs and botocore retry a few times on their own; the tests turn that off so every injected
# fault reaches saescale's retry layer (in production both layers run, botocore's first)
NO_CLIENT_RETRIES = {"config_kwargs": {"retries": {"max_attempts": 1}}}


@pytest.fixture()
def faulty_s3(s3_bucket, s3_endpoint, monkeypatch):
    """(proxy, bucket url, options through the proxy, options straight to moto)."""
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # s3fs's own retry count (a class setting)
    url, direct = s3_bucket
    proxy = FaultProxy(s3_endpoint)
    options = {**storage.endpoint_options(proxy.start()), "skip_instance_cache": True, **NO_CLIENT_RETRIES}
    yield proxy, url, options, direct
    proxy.stop()


def _retry_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if "storage:" in line and "retrying in" in line]


def test_a_write_waits_out_an_outage(faulty_s3, capsys, monkeypatch):
    proxy, url, options, direct = faulty_s3
    monkeypatch.setenv(retry.ENV_BUDGET, "60")
    proxy.outage_for(3.0, "down")  # the port refuses connections for 3 s
    start = time.monotonic()
    storage.write_json_atomic(f"{url}/run/result.json", {"steps": 7}, options)
    assert time.monotonic() - start >= 2.0
    assert storage.read_json(f"{url}/run/result.json", direct) == {"steps": 7}
    lines = _retry_lines(capsys)
    assert lines and all("write s3://" in line and "attempt" in line for line in lines)


def test_throttling_on_a_fifth_of_the_requests_loses_nothing(faulty_s3, capsys, monkeypatch):
    proxy, url, options, direct = faulty_s3
    monkeypatch.setenv(retry.ENV_BUDGET, "60")
    proxy.fail_fraction(0.2, "503")
    for i in range(12):
        storage.write_bytes_atomic(f"{url}/shards/{i}.bin", bytes([i]) * 100, options)
    read = [storage.read_bytes(f"{url}/shards/{i}.bin", options) for i in range(12)]
    proxy.stop_fault()
    assert read == [bytes([i]) * 100 for i in range(12)]
    # every 503 is retried by someone: saescale (one line each) or, for some calls, botocore itself
    assert proxy.counts["503"] >= 1 and 1 <= len(_retry_lines(capsys)) <= proxy.counts["503"]


def test_a_missing_object_fails_at_once(faulty_s3, capsys):
    _, url, options, _ = faulty_s3
    start = time.monotonic()
    with pytest.raises(storage.StorageError, match="not found"):
        storage.read_bytes(f"{url}/no/such/object", options)
    assert time.monotonic() - start < 5 and not _retry_lines(capsys)


def test_storage_down_past_the_budget_is_one_line(faulty_s3, capsys, monkeypatch):
    proxy, url, options, _ = faulty_s3
    monkeypatch.setenv(retry.ENV_BUDGET, "2")
    start = time.monotonic()
    with proxy.outage("down"), pytest.raises(storage.StorageError) as caught:
        storage.read_bytes(f"{url}/anything", options)
    assert time.monotonic() - start < 10
    message = str(caught.value)
    assert "\n" not in message and "storage did not answer for" in message and "storage.retry_s=2" in message
    assert f"read {url}/anything" in message


def test_a_write_cut_by_an_outage_publishes_nothing(faulty_s3, monkeypatch):
    proxy, url, options, direct = faulty_s3
    monkeypatch.setenv(retry.ENV_BUDGET, "1")
    target = f"{url}/ckpt/meta.json"
    with proxy.outage("reset"), pytest.raises(storage.StorageError):
        storage.write_json_atomic(target, {"step": 1}, options)
    assert not storage.exists(target, direct)
    assert not s3fs.S3FileSystem(**direct).ls(url.removeprefix("s3://"))  # no partial or temporary object
    storage.write_json_atomic(target, {"step": 1}, options)  # storage is back
    assert storage.read_json(target, direct) == {"step": 1}


@pytest.mark.parametrize(
    "error,transient",
    [
        (ConnectionRefusedError(), True),
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (OSError(errno.EBUSY, "SlowDown"), True),  # s3fs's translation of SlowDown / 503
        (OSError("An error occurred (503) when calling the PutObject operation"), True),
        (FileNotFoundError("no such key"), False),
        (PermissionError("AccessDenied"), False),
        (type("NoCredentialsError", (Exception,), {})("Unable to locate credentials"), False),
        (ValueError("bad"), False),
    ],
)
def test_transient_and_permanent_errors_are_told_apart(error, transient):
    assert retry.is_transient(error) is transient


def test_a_permanent_error_inside_a_transient_looking_one_is_permanent():
    try:
        try:
            raise PermissionError("AccessDenied")
        except PermissionError as inner:
            raise OSError("request failed after connection reset") from inner
    except OSError as outer:
        assert retry.is_transient(outer) is False


def _parquet_shard(url: str, options: dict) -> tuple[str, bytes]:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.table({"x": list(range(1000))}), sink)
    data = sink.getvalue()
    storage.write_bytes_atomic(url, data, options)
    return url, data


def test_a_shard_read_waits_out_resets_and_an_outage(faulty_s3, capsys, monkeypatch):
    """The Ray Data datasource's read (`stream.read_shard`) through pyarrow over s3fs, as in a
    training run: faults on the open and the read are retried, the bytes still checked."""
    import hashlib

    from saescale.service.stream import ShardCheck, arrow_filesystem, read_shard

    proxy, url, options, direct = faulty_s3
    monkeypatch.setenv(retry.ENV_BUDGET, "60")
    shard_url, data = _parquet_shard(f"{url}/cache/shard-00000.parquet", direct)
    fs, path = arrow_filesystem(shard_url, options)
    check = ShardCheck(hashlib.sha256(data).hexdigest(), len(data), "shard-00000.parquet in the cache", "rebuild")

    def open_stream():
        return fs.open_input_stream(path, compression=None, buffer_size=0)

    proxy.fail_next(3, "reset")
    assert read_shard(open_stream, check, ["x"]).column("x").to_pylist() == list(range(1000))
    assert proxy.counts["reset"] == 3
    proxy.outage_for(3.0, "down")  # longer than s3fs's and botocore's own retries last
    start = time.monotonic()
    assert read_shard(open_stream, check, ["x"]).column("x").to_pylist() == list(range(1000))
    assert time.monotonic() - start >= 2.0
    assert any("shard-00000.parquet" in line for line in _retry_lines(capsys))  # the open or the read


def test_a_corrupt_shard_is_not_retried(faulty_s3, capsys):
    from saescale.data.format import CorruptShardError
    from saescale.service.stream import ShardCheck, arrow_filesystem, read_shard

    _, url, options, direct = faulty_s3
    shard_url, data = _parquet_shard(f"{url}/cache/shard-00001.parquet", direct)
    fs, path = arrow_filesystem(shard_url, options)
    check = ShardCheck("0" * 64, len(data), "shard-00001.parquet in the cache", "rebuild it")
    with pytest.raises(CorruptShardError, match="checksum mismatch"):
        read_shard(lambda: fs.open_input_stream(path, compression=None, buffer_size=0), check, ["x"])
    assert not _retry_lines(capsys)


def test_pyarrow_calls_over_s3_wait_out_an_outage(faulty_s3, capsys, monkeypatch):
    """What Ray Train and Ray Data drive through `arrow_filesystem` (storage checks, checkpoint
    uploads and downloads) waits an outage out: a file info, a copy in and a copy out."""
    import pyarrow.fs as pafs

    from saescale.service.stream import arrow_filesystem

    proxy, url, options, direct = faulty_s3
    monkeypatch.setenv(retry.ENV_BUDGET, "60")
    storage.write_bytes_atomic(f"{url}/ckpt/meta.json", b'{"step": 3}', direct)
    fs, root = arrow_filesystem(f"{url}/ckpt", options)
    proxy.outage_for(2.5, "down")
    assert fs.get_file_info(f"{root}/meta.json").type == pafs.FileType.File
    local = pafs.LocalFileSystem()
    target = str(__import__("tempfile").mkdtemp())
    pafs.copy_files(f"{root}/meta.json", f"{target}/meta.json", source_filesystem=fs, destination_filesystem=local)
    proxy.outage_for(2.5, "down")
    pafs.copy_files(f"{target}/meta.json", f"{root}/copy.json", source_filesystem=local, destination_filesystem=fs)
    assert storage.read_bytes(f"{url}/ckpt/copy.json", direct) == b'{"step": 3}'
    assert len(_retry_lines(capsys)) >= 2


def test_a_missing_file_is_still_missing_through_pyarrow(faulty_s3):
    import pyarrow.fs as pafs

    from saescale.service.stream import arrow_filesystem

    _, url, options, _ = faulty_s3
    fs, root = arrow_filesystem(url, options)
    assert fs.get_file_info(f"{root}/nothing/here").type == pafs.FileType.NotFound
    with pytest.raises(FileNotFoundError):
        fs.open_input_stream(f"{root}/nothing/here")


def test_bench_soak_names_what_is_missing(tmp_path):
    """`saescale bench soak` before a cache exists, or away from the project root: one line, exit 2."""
    cache = tmp_path / "cache"

    def soak(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "saescale.cli", "bench", "soak", f"--cache={cache}", "--project", ROOT, *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    proc = soak()
    assert proc.returncode == 2 and f"no activation cache at {cache}" in proc.stderr, proc.stderr[-2000:]
    cache.mkdir()
    (cache / "manifest.json").write_text("{}")
    proc = soak("--project", str(tmp_path))
    assert proc.returncode == 2 and f"no jobs/train.py under {tmp_path}" in proc.stderr, proc.stderr[-2000:]


def test_the_retry_budget_reaches_ray_datas_read_tasks(faulty_s3):
    """Ray Data wraps the datasource filesystem in its own retrying one: the job's budget is
    still what a shard re-read uses."""
    from ray.data._internal.util import RetryingPyFileSystem

    from saescale.service.stream import arrow_filesystem, retry_budget, set_retry_budget

    _, url, options, _ = faulty_s3
    filesystem, _ = arrow_filesystem(url, options)
    set_retry_budget(filesystem, 7.0)
    assert retry_budget(RetryingPyFileSystem.wrap(filesystem, retryable_errors=[])) == 7.0


def test_a_worker_group_failed_on_storage_restarts_once_storage_answers(faulty_s3, capsys):
    """The controller's policy (`service.failures`): a rank's exhausted storage call, echoed by
    its peer as a RankError, is a storage fault: the restart waits for storage (the fault proxy
    refusing connections), and when storage stays silent past the wait the run stops with one
    line naming the storage URL and the rerun that resumes."""
    from ray.train import ControllerError

    from saescale.service.failures import StorageUnavailable, failure_policy
    from saescale.service.stream import arrow_filesystem
    from saescale.train.trainer import RankError

    proxy, url, options, _ = faulty_s3
    filesystem, path = arrow_filesystem(f"{url}/runs", options)
    exhausted = retry.RetriesExhausted(f"write {url}/runs/x: storage did not answer for 3 s")
    errors = {0: RankError(f"rank 1: RetriesExhausted: {exhausted}"), 1: RuntimeError("upload failed")}
    errors[1].__cause__ = exhausted
    policy = failure_policy([(filesystem, path, f"{url}/runs")], wait_s=2.0, max_failures=5)

    policy.after_exception(None, errors)  # storage answers: Ray may restart the group
    assert "answers again" in capsys.readouterr().err
    policy.after_exception(None, {0: errors[0]})  # only the peer's echo reached the controller's poll
    assert "answers again" in capsys.readouterr().err

    with proxy.outage("down"), pytest.raises(ControllerError) as stopped:
        start = time.monotonic()
        policy.after_exception(None, errors)
    assert 1.5 < time.monotonic() - start < 10
    cause = stopped.value.controller_failure
    assert type(cause) is StorageUnavailable and "\n" not in str(cause), repr(cause)
    assert str(cause).startswith(f"storage {url}/runs is unreachable: write {url}/runs/x: storage did not")
    assert "no answer in 2 s more before a restart" in str(cause) and "rerun the same command" in str(cause)


def test_crashes_spend_ray_max_failures_and_preemptions_do_not(capsys):
    """The policy counts a run's crashes itself (Ray's own limit is unlimited): past
    `ray.max_failures` the run ends with one line naming the last error, while a preemption
    (every rank checkpointed and raised `Preempted`) restarts for free, however many come."""
    from ray.train import ControllerError

    from saescale.service.failures import RestartsExhausted, failure_policy
    from saescale.service.preemption import Preempted

    policy = failure_policy([], wait_s=1.0, max_failures=1)
    for _ in range(3):
        policy.after_exception(
            None, {0: Preempted("preempted at step 6; its checkpoint is registered"), 1: Preempted("x")}
        )
    assert capsys.readouterr().err.count("not counted against ray.max_failures") == 3
    policy.after_exception(None, {0: RuntimeError("worker 0 died")})  # the one restart allowed
    with pytest.raises(ControllerError) as stopped:
        policy.after_exception(None, {1: RuntimeError("worker 1 died\nits traceback")})
    cause = stopped.value.controller_failure
    assert type(cause) is RestartsExhausted
    assert str(cause) == "2 worker-group failures (ray.max_failures=1); the last: worker 1 died"


def test_an_outage_past_the_budget_exits_1_not_2(tmp_path):
    """A job's storage that did not answer is not bad input: `fail` exits 1 (a rerun may work)."""
    from saescale.app.errors import EXIT_BAD_INPUT, EXIT_FAILED, fail

    outage = storage.StorageError("write s3://b/result.json: storage did not answer for 300 s")
    outage.__cause__ = retry.RetriesExhausted("write s3://b/result.json")
    for error, code in ((outage, EXIT_FAILED), (storage.StorageError("not found: s3://b/x"), EXIT_BAD_INPUT)):
        with pytest.raises(SystemExit) as exited:
            fail(error)
        assert exited.value.code == code


def test_a_controller_that_cannot_start_is_one_line_naming_the_missing_credentials():
    """Ray hands a controller's creation error to the driver as text inside a RayActorError (seen
    when a job joined a cluster whose nodes had no S3 credentials): the job's line is its last
    `...Error: ...` line, with what the nodes need."""
    from ray.exceptions import RayActorError

    from saescale.service.ray_train import controller_start_line

    text = (
        "The actor died because of an error raised in its creation task, ray::TrainController.__init__() "
        '(pid=1, ip=10.0.0.1)\n  File "/x/s3fs/core.py", line 169, in _error_wrapper\n'
        "    raise NoCredentialsError()\nbotocore.exceptions.NoCredentialsError: Unable to locate credentials"
    )
    line = controller_start_line(RayActorError(error_msg=text), "s3://key:secret@bucket/runs")
    assert "\n" not in line and "secret" not in line
    assert line.startswith("Ray Train's controller could not start: botocore.exceptions.NoCredentialsError")
    assert "AWS_ACCESS_KEY_ID" in line and "s3://***@bucket/runs" in line


def test_the_soak_demands_identical_weights_unless_a_layout_took_another_dp_tp():
    """A run whose one worker ran the configured TP ranks as threads took the same steps: the
    soak then wants bit-identical weights, not just the NMSE bound."""
    from saescale.bench.soak import same_math

    start = {"step": 0, "workers": 2, "dp": 1, "tp": 2}
    assert same_math([]) and same_math([start])
    assert same_math([start, {"step": 9, "workers": 1, "dp": 1, "tp": 1, "shard_threads": 2}, start])
    assert not same_math([start, {"step": 9, "workers": 1, "dp": 1, "tp": 1}])
    assert not same_math([{"step": 0, "workers": 4, "dp": 2, "tp": 2}, {"step": 9, "workers": 2, "dp": 1, "tp": 2}])
    threads = {"step": 0, "workers": 1, "dp": 1, "tp": 1, "shard_threads": 2}  # a run that started on one worker
    assert same_math([threads, start])
    four = {"step": 0, "workers": 4, "dp": 1, "tp": 4}
    assert not same_math([four, {"step": 9, "workers": 1, "dp": 1, "tp": 1, "shard_threads": 4}])
