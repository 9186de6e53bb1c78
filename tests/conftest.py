"""Shared test settings: two threads like the target machine, wandb offline and local.

`make test` runs the files in parallel (pytest-xdist, `--dist loadfile`: a file's module
fixtures, such as a shared Ray run, are built once, on one worker). With 3 workers the suite keeps
both cores busy (2% idle, measured with vmstat over a whole run); most of its CPU is Ray's own
processes (a tiny Ray Train run: ~35 s of CPU, ~1 s of it training; its controller, train
workers, Ray Train's and Ray Data's helper actors and the cluster's daemons), so a faster suite
needs fewer Ray jobs, not more workers. The gloo tests' ranks fork from a fork server
(`helpers.spawn_ranks`). The files that take longest start first (`SLOWEST_FIRST`), and the
session's built inputs (the small cache, the tiny model) are built once for all workers."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from saescale import storage

# the test files that take longest (`--durations`), started first so that none of them is the
# last to begin while the other workers sit idle; the rest keep their order
SLOWEST_FIRST = (
    "test_storage_outage_job.py",
    "test_train_job.py",
    "test_node_loss.py",
    "test_model_stream_job.py",
    "test_cache.py",
    "test_features.py",
    "test_sweep.py",
    "test_train_job_submit.py",
    "test_paper.py",
    "test_shard_integrity.py",
    "test_bench.py",
    "test_training.py",
    "test_probes.py",
    "test_storage_faults.py",
    "test_sync_free.py",
    "test_executor_idle.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """`build(folder)` once for the whole run: under pytest-xdist the first worker to get here
    builds into the run's shared temp folder while the others wait on a file lock, then all of
    them read it (a folder that is only read, never changed, by the tests)."""
    from filelock import FileLock

    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    root = tmp_path_factory.getbasetemp().parent  # one per run, shared by its workers
    folder, done = root / name, root / f"{name}.built"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(folder)  # a half-built one from a worker that died
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# sparsify (the interop tests' peer) takes its Triton decoder whenever triton imports, and the
# `kernels` extra installs triton; its CPU tensors need sparsify's eager decoder
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
# The suite is CPU-bound on 2 cores (vmstat: ~2% idle under `make test`), and most of that CPU is
# Ray's own processes, not training. For every Ray the tests start (embedded in a job, a local
# cluster, `ray start`): no memory monitor reading every process's memory 4 times a second, no
# metrics export, idle workers kept a minute instead of killed after 1 s and started again
# (with the product's RAY_prestart_worker_first_driver=0: 12% less CPU on the sweep test)
for _key, _value in {
    "RAY_memory_monitor_refresh_ms": "0",
    "RAY_enable_metrics_collection": "0",
    "RAY_idle_worker_killing_time_threshold_ms": "60000",
}.items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible HTTP server (moto) on loopback, for the whole test session."""

    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise

    from saescale.net import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture()
def s3_bucket(s3_endpoint, monkeypatch):
    """A fresh bucket; returns (s3 url prefix, storage_options for fsspec)."""
    import uuid

    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-key")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    options = {**storage.endpoint_options(s3_endpoint), "skip_instance_cache": True}
    name = f"bucket-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**options).mkdir(name)
    return f"s3://{name}", options


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny randomly initialised Llama with SmolLM2's real tokenizer, saved as a local model dir."""
    from saescale.lm.tiny import save_tiny_llama

    def build(path: Path) -> None:
        save_tiny_llama(str(path), hidden_size=48, layers=3)

    return str(built_once(tmp_path_factory, "tiny-llama", build))


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory):
    """A real 4096-token cache of the embedded default (SmolLM2 layer 8 on Shakespeare), built
    through the cache job's command line without Ray: 4 shards of 1024 rows."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def build(folder: Path) -> None:
        cmd = [
            sys.executable,
            os.path.join(root, "jobs", "cache.py"),
            f"output={folder / 'smol'}",
            "use_ray=false",
            "max_tokens=4096",
            "rows_per_shard=1024",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "cache ready: 4" in proc.stdout

    return str(built_once(tmp_path_factory, "cache", build) / "smol")
