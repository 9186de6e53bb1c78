"""`train.checkpoint_every=auto`: the Young/Daly interval from each checkpoint's measured stall
and the mean step time, the same on every rank, and the copy-aside that lets a checkpoint be
written while training goes on. The Ray service's background upload runs in the real jobs of
tests/test_train_job.py (every checkpoint there, a worker killed inside one)."""

from __future__ import annotations

import math

import pytest
import torch

from saescale.core.config import ConfigError, SAEConfig, TrainConfig
from saescale.core.model import TopKSAE
from saescale.distributed.plan import young_daly_interval_s
from saescale.train.cadence import FIRST_STEP, CheckpointCadence
from saescale.train.checkpoint import copy_aside, latest_step
from saescale.train.trainer import Trainer


def test_young_daly_interval_and_the_steps_every_rank_agrees_on():
    assert young_daly_interval_s(0.5, 100.0) == pytest.approx(10.0)  # sqrt(2 x 0.5 x 100)
    fixed = CheckpointCadence.of(100, mtbf_s=60.0)
    assert [s for s in range(1, 301) if fixed.due(s)] == [100, 200, 300]
    assert fixed.saved(100, 5.0, 0.1) is None  # a fixed cadence never moves
    assert not any(CheckpointCadence.of(None, 60.0).due(s) for s in range(1, 50))

    auto = CheckpointCadence.of("auto", mtbf_s=100.0, start_step=40)  # a resumed run at step 40
    assert not auto.due(40 + FIRST_STEP - 1) and auto.due(40 + FIRST_STEP)
    # this rank measured 0.1 s stalls and 0.01 s steps; another rank was slower: the maxima count,
    # so every rank computes the same next step
    seen = []

    def slowest(values):
        seen.append(values)
        return [max(v, w) for v, w in zip(values, [0.5, 0.02])]

    interval = auto.saved(60, 0.1, 0.01, slowest)
    assert seen == [[0.1, 0.01]]
    assert interval == round(math.sqrt(2 * 0.5 * 100.0) / 0.02) == 500
    assert auto.next_step == 560 and not auto.due(559) and auto.due(560)
    # a free checkpoint still leaves at least one step between two; a dear one is capped
    assert auto.saved(560, 0.0, 0.01) == 1
    assert auto.saved(561, 1e6, 1e-6) == 100_000


def test_bad_cadence_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="checkpoint_every must be an integer >= 1 or 'auto', got 'often'"):
        TrainConfig(checkpoint_every="often")
    with pytest.raises(ConfigError, match="must be an integer >= 1"):
        TrainConfig(checkpoint_every=0)
    with pytest.raises(ConfigError, match=r"ray.mtbf_s \(train.checkpoint_mtbf_s\) must be > 0"):
        TrainConfig(checkpoint_every="auto", checkpoint_mtbf_s=0)


def test_auto_checkpoints_first_early_then_at_the_measured_interval(tmp_path):
    """A real local run: the first checkpoint at FIRST_STEP, then one every
    sqrt(2 x stall x MTBF) / step time steps; with a short MTBF, several in 80 steps."""
    cfg = SAEConfig(d_in=32, n_latents=256, k=8, dead_tokens_threshold=512)
    tcfg = TrainConfig(lr=1e-3, log_every=10, checkpoint_every="auto", checkpoint_mtbf_s=0.05)
    trainer = Trainer(TopKSAE(cfg), tcfg, checkpoint_url=str(tmp_path / "ckpt"))
    g = torch.Generator().manual_seed(0)
    summary = trainer.fit([torch.randn(128, 32, generator=g) for _ in range(80)])
    assert summary.checkpoints >= 3, summary  # FIRST_STEP, at least one at the interval, the final one
    assert summary.checkpoint_every is not None and summary.checkpoint_every >= 1
    assert summary.checkpoint_stall_s > 0
    assert latest_step(str(tmp_path / "ckpt")) == 80


def test_a_copy_aside_is_not_changed_by_the_steps_that_follow():
    """What a background upload writes is the state of its step, whatever training does next."""
    cfg = SAEConfig(d_in=16, n_latents=64, k=4, dead_tokens_threshold=512)
    trainer = Trainer(TopKSAE(cfg), TrainConfig(lr=1e-2, log_every=100))
    g = torch.Generator().manual_seed(1)
    trainer.fit([torch.randn(64, 16, generator=g) for _ in range(3)])
    copied = copy_aside(trainer, extra={"data": {"step": trainer.step}})
    w_dec = trainer.sae.W_dec.detach().clone()
    (name,) = [n for n in copied.files if n.endswith(".sae.safetensors")]
    assert torch.equal(copied.files[name]["W_dec"], w_dec)
    trainer.fit([torch.randn(64, 16, generator=g) for _ in range(2)])
    assert not torch.equal(trainer.sae.W_dec.detach(), w_dec)  # training moved on
    assert torch.equal(copied.files[name]["W_dec"], w_dec)  # the copy did not
    assert copied.meta["trainer"]["step"] == 3 and copied.meta["data"] == {"step": 3}
    assert copied.nbytes > 2 * 64 * 16 * 4


def test_a_preemption_is_told_from_a_crash():
    """What the controller's policy restarts without spending a restart: every rank's error is a
    notice that was acted on (`Preempted`, also behind a worker-group error) or Ray's own record
    of a node reclaim (`RayActorError.preempted` behind a failed health check)."""
    from saescale.service.failures import is_preemption
    from saescale.service.preemption import Preempted

    class ActorDied(Exception):  # stands in for ray.exceptions.RayActorError (built by Ray only)
        preempted = True

    class HealthCheckFailed(Exception):
        def __init__(self, failure: BaseException) -> None:
            super().__init__("health check failed")
            self.health_check_failure = failure

    try:
        raise RuntimeError("worker group failed") from Preempted("preempted at step 6")
    except RuntimeError as wrapped:
        assert is_preemption(wrapped)
    assert is_preemption(HealthCheckFailed(ActorDied()))
    assert not is_preemption(HealthCheckFailed(RuntimeError("SIGKILL")))
    assert not is_preemption(RuntimeError("loss became nan"))


def test_a_background_write_costs_the_time_it_adds_to_the_steps_it_overlaps():
    """A CPU run's upload competes with training for the cores: its cost is its stall plus what
    the steps that overlapped it took beyond clean ones, so auto checkpoints less often than the
    stall alone says (on the 2-core soak the stall alone chose a checkpoint every ~2 s)."""
    auto = CheckpointCadence.of("auto", mtbf_s=60.0)
    # 30 steps since the last checkpoint, 3.0 s; 10 of them (1.5 s) overlapped its write: clean
    # steps take 0.075 s, so the write added 1.5 - 10 x 0.075 = 0.75 s
    overhead, clean = auto.write_overhead(30, 3.0, 10, 1.5)
    assert clean == pytest.approx(0.075) and overhead == pytest.approx(0.75)
    interval = auto.saved(100, 0.02 + overhead, clean)
    assert interval == round(math.sqrt(2 * 0.77 * 60.0) / 0.075)  # not sqrt(2 x 0.02 x 60) / 0.1
    # a write as long as the interval: no clean step, the last clean time counts
    assert auto.write_overhead(8, 1.6, 8, 1.6) == (pytest.approx(1.6 - 8 * 0.075), pytest.approx(0.075))
    # no write in flight: no overhead, and never a negative one from noise
    assert auto.write_overhead(10, 0.7, 0, 0.0)[0] == 0.0
    assert auto.write_overhead(10, 0.7, 5, 0.1)[0] == 0.0
