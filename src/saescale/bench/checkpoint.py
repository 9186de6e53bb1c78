"""`saescale bench checkpoint`: what a checkpoint costs the training steps, written in the
training thread (as before background checkpoints) against copied aside and written by a
background thread (the service's `storage.checkpoint_in_background`), in one run.

One trainer trains `steps` steps three times: alone (the baseline step time), right after a
synchronous checkpoint (write_rank_files + write_meta into a local folder: the training thread
waits for the whole write), and right after a background one (`copy_aside`, then a thread
writes the same files while the steps run, as Ray's upload thread does in the service). A
checkpoint's cost is its stall plus whatever the steps that follow lost to it (the writer
thread shares the cores), against the baseline. Prints one JSON object; `ratio` is the
background cost over the synchronous one.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from typing import Any

import torch

from saescale.core.config import SAEConfig, TrainConfig
from saescale.core.model import TopKSAE
from saescale.train.checkpoint import copy_aside, write_files, write_meta, write_rank_files
from saescale.train.trainer import Trainer


def _steps(trainer: Trainer, batches: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    trainer.fit(batches)
    return time.perf_counter() - start


def bench_checkpoint(
    d_in: int = 576,
    n_latents: int = 2**18,
    k: int = 32,
    batch: int = 1024,
    steps: int = 4,
    threads: int | None = None,
    folder: str | None = None,
) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    trainer = Trainer(
        TopKSAE(SAEConfig(d_in=d_in, n_latents=n_latents, k=k, dead_tokens_threshold=10**9)),
        TrainConfig(lr=1e-4, log_every=10**9, histogram_every=10**9, precision="fp32"),
    )
    data = [torch.randn(batch, d_in, generator=g) for _ in range(steps)]
    trainer.initialize(data[0])
    _steps(trainer, data[:1])  # warm-up: Adam's state exists from here on
    baseline = _steps(trainer, data)
    with tempfile.TemporaryDirectory(prefix="saescale-bench-ckpt-", dir=folder) as tmp:
        start = time.perf_counter()
        write_rank_files(os.path.join(tmp, "sync"), trainer)
        write_meta(os.path.join(tmp, "sync"), trainer)
        sync_stall = time.perf_counter() - start
        after_sync = _steps(trainer, data)

        start = time.perf_counter()
        copied = copy_aside(trainer)
        bg_stall = time.perf_counter() - start
        written: dict[str, float] = {}

        def write() -> None:
            t0 = time.perf_counter()
            write_files(os.path.join(tmp, "background"), copied.files)
            written["s"] = time.perf_counter() - t0

        writer = threading.Thread(target=write)
        writer.start()
        after_bg = _steps(trainer, data)
        writer.join()
        nbytes = sum(os.path.getsize(os.path.join(tmp, "sync", f)) for f in os.listdir(os.path.join(tmp, "sync")))
    sync_cost = sync_stall + max(after_sync - baseline, 0.0)
    bg_cost = bg_stall + max(after_bg - baseline, 0.0)
    return {
        "bench": "checkpoint",
        "d_in": d_in,
        "n_latents": n_latents,
        "batch": batch,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "checkpoint_bytes": nbytes,
        "step_s": baseline / steps,
        "sync_stall_s": sync_stall,
        "sync_cost_s": sync_cost,
        "background_stall_s": bg_stall,
        "background_write_s": written.get("s"),
        "background_steps_slowdown_s": after_bg - baseline,
        "background_cost_s": bg_cost,
        "ratio": bg_cost / max(sync_cost, 1e-9),
        "sync_cost_in_steps": sync_cost / (baseline / steps),
        "background_cost_in_steps": bg_cost / (baseline / steps),
    }
