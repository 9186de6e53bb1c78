"""Shared test settings: two threads like the target machine, wandb offline and local."""

from __future__ import annotations

import os

import pytest
import torch

from saescale import storage

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from saescale.lm.embedded import EMBEDDED_MODEL
    from saescale.lm.models import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(EMBEDDED_MODEL))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory):
    """A real 4096-token cache of the embedded default (SmolLM2 layer 8 on Shakespeare), built
    through the cache job's command line without Ray: 4 shards of 1024 rows."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path_factory.mktemp("cache") / "smol"
    cmd = [
        sys.executable,
        os.path.join(root, "jobs", "cache.py"),
        f"output={out}",
        "use_ray=false",
        "max_tokens=4096",
        "rows_per_shard=1024",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cache ready: 4" in proc.stdout
    return str(out)
