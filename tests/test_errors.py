"""Bad input gets a clear error naming the problem."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from saescale.core.config import ConfigError, SAEConfig, TrainConfig
from saescale.core.model import InputShapeError, NonFiniteInputError, TopKSAE
from saescale.train.trainer import Trainer


def _trainer():
    return Trainer(TopKSAE(SAEConfig(d_in=16, n_latents=64, k=4)), TrainConfig())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_batch_is_rejected(bad):
    trainer = _trainer()
    trainer.fit([torch.randn(32, 16)])
    x = torch.randn(32, 16)
    x[3, 5] = bad
    before = trainer.sae.W_enc.detach().clone()
    with pytest.raises(NonFiniteInputError, match=r"NaN or inf.*first bad rows: \[3\]"):
        trainer.fit([x])
    torch.testing.assert_close(trainer.sae.W_enc, before)  # nothing was updated
    assert trainer.step == 1


def test_wrong_d_model_is_rejected():
    trainer = _trainer()
    with pytest.raises(InputShapeError, match=r"d_in=16.*\(32, 20\)"):
        trainer.fit([torch.randn(32, 20)])
    with pytest.raises(InputShapeError):
        TopKSAE(SAEConfig(d_in=16, n_latents=64, k=4))(torch.randn(16))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(d_in=16, n_latents=64, k=65), "k=65 is larger than sae.n_latents=64"),
        (dict(d_in=0, n_latents=64, k=4), "sae.d_in must be a positive integer"),
        (dict(d_in=16, n_latents=64, k=4, k_aux=100), "sae.k_aux"),
        (dict(d_in=16, n_latents=64, k=32, multi_topk=True), "multi_topk"),
        (dict(d_in=16, n_latents=64, k=4, normalization="layernorm"), "sae.normalization"),
        (dict(d_in=16, n_latents=64, k=4, auxk_coef=-1), "sae.auxk_coef"),
    ],
)
def test_bad_sae_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SAEConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1.0), "train.lr"),
        (dict(beta1=1.0), "train.beta1"),
        (dict(eps=0.0), "train.eps"),
        (dict(decay_start_frac=0.5), "total_steps"),
        (dict(ema_decay=1.5), "train.ema_decay"),
        (dict(clip_grad_norm=0.0), "train.clip_grad_norm"),
        (dict(histogram_every=0), "train.histogram_every"),
        (dict(histogram_every=-5), "train.histogram_every"),
        (dict(log_every=0), "train.log_every"),
        (dict(log_every=-1), "train.log_every"),
        (dict(checkpoint_every=0), "train.checkpoint_every"),
        (dict(checkpoint_every=-10), "train.checkpoint_every"),
    ],
)
def test_bad_train_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kwargs)


def test_every_one_step_intervals_are_accepted():
    """1 is the smallest interval; checkpoint_every=None (no periodic checkpoints) stays allowed."""
    cfg = TrainConfig(log_every=1, histogram_every=1, checkpoint_every=None)
    assert (cfg.log_every, cfg.histogram_every, cfg.checkpoint_every) == (1, 1, None)


def test_k_aux_default_is_power_of_two_near_half_d():
    assert SAEConfig(d_in=576, n_latents=4096, k=32).k_aux == 256
    assert SAEConfig(d_in=768, n_latents=4096, k=32).k_aux in (256, 512)
    assert SAEConfig(d_in=4096, n_latents=2**16, k=32).k_aux == 2048


def test_bench_step_cli_prints_json_and_rejects_bad_args():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "saescale.cli",
            "bench",
            "step",
            "--d-in",
            "32",
            "--n-latents",
            "512",
            "--k",
            "8",
            "--batch",
            "256",
            "--dead-fraction",
            "0.1",
            "--repeats",
            "3",
            "--warmup",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("step_s", "tokens_per_s", "peak_rss_mb", "floor_s", "step_over_floor", "naive_s", "naive_over_step"):
        assert result[key] > 0, key
    bad = subprocess.run(
        [sys.executable, "-m", "saescale.cli", "bench", "step", "--d-in", "32", "--n-latents", "16", "--k", "64"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0
    assert "k=64 is larger than sae.n_latents=16" in bad.stderr


def test_a_crash_through_the_restarts_is_one_readable_line():
    from saescale.app.train_job import crash_line

    oom = (
        "Training failed due to controller error: 2 worker(s) were killed due to the node running low on "
        "memory. Memory on the node was 21.73GB used / 23.54GB limit\n" + "Top 10 memory users: ...\n" * 20
    )
    line = crash_line(oom, 2, int(9.89 * 2**30))
    assert "\n" not in line and "memory monitor killed the workers (planned 9.89 GiB per worker)" in line
    assert "raise train.micro_batches" in line
    long = "x" * 5000 + "\nsecond line"
    line = crash_line(long, 1, 0)
    assert line.endswith("...") and len(line) < 500 and "second" not in line


def test_the_default_worker_memory_leaves_room_for_ray_and_the_driver():
    import psutil

    from saescale.app.train_job import local_worker_memory_gib

    total = psutil.virtual_memory().total / 2**30
    assert local_worker_memory_gib(2) == pytest.approx((0.95 * total - 5.0) / 2)
    assert local_worker_memory_gib(2) < total / 2
