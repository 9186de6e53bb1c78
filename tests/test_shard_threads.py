"""A tp=2 layout's ranks as threads of one process (`saescale.train.shard_threads`, what an elastic run
that shrank to one worker trains with) against the same layout in two gloo processes: the same
weights, Adam state, dead-latent counters and losses, bit for bit, in fp32 and bf16, with AuxK
and micro-batches, through clipping and the EMA; while the plain one-process step is only close
(the drift an elastic run had before). And the thread collectives themselves."""

from __future__ import annotations

import os
import threading

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from helpers import spawn_ranks
from saescale.core.config import SAEConfig, TrainConfig
from saescale.core.model import TopKSAE
from saescale.core.synthetic import SparseDictionary
from saescale.distributed.mesh import ParallelDims
from saescale.distributed.thread_group import ThreadGroup
from saescale.net import free_port
from saescale.train.rank_setup import build_rank_trainer, local_share
from saescale.train.trainer import Trainer

STEPS, BATCH = 14, 96


def _cfgs(precision: str, micro_batches: int) -> tuple[SAEConfig, TrainConfig]:
    # a low dead threshold: AuxK runs (and must agree) in the later steps
    sae = SAEConfig(d_in=24, n_latents=256, k=6, k_aux=16, dead_tokens_threshold=4 * BATCH)
    train = TrainConfig(
        lr=4e-3,
        log_every=1,
        histogram_every=1000,
        seed=5,
        clip_grad_norm=0.5,
        ema_decay=0.9,
        precision=precision,
        micro_batches=micro_batches,
    )
    return sae, train


def _data() -> tuple[torch.Tensor, list[torch.Tensor]]:
    truth = SparseDictionary.random(d=24, n_atoms=96, active=4, noise=0.02, seed=2)
    g = torch.Generator().manual_seed(3)
    return truth.sample(512, g), [truth.sample(BATCH, g) for _ in range(STEPS)]


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {n: p.detach().clone() for n, p in trainer.sae.named_parameters()}
    for i, p in enumerate(trainer.params):
        for key, value in trainer.optimizer.state[p].items():
            if torch.is_tensor(value) and value.dim() > 0:
                out[f"adam{i}.{key}"] = value.clone()
    out["dead"] = trainer.tracker.tokens_since_fired.clone()
    out["losses"] = torch.tensor([h["loss"] for h in trainer.summary.history], dtype=torch.float64)
    out["auxk"] = torch.tensor([h["auxk_loss"] for h in trainer.summary.history], dtype=torch.float64)
    return out


def _tp_worker(rank: int, port: int, out_dir: str, precision: str, micro_batches: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        dims = ParallelDims(dp=1, tp=2)
        trainer = build_rank_trainer(*_cfgs(precision, micro_batches), dims, rank)
        sample, batches = _data()
        trainer.initialize(sample)
        trainer.fit((local_share(b, dims, rank) for b in batches), max_steps=STEPS)
        save_file(
            {k: v.contiguous() for k, v in _state(trainer).items()}, os.path.join(out_dir, f"tp{rank}.safetensors")
        )
    finally:
        dist.destroy_process_group()


def _one_process(precision: str, micro_batches: int, shard_threads: int) -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    sae_cfg, train_cfg = _cfgs(precision, micro_batches)
    trainer = build_rank_trainer(sae_cfg, train_cfg, ParallelDims(dp=1, tp=1), 0, shard_threads=shard_threads)
    sample, batches = _data()
    trainer.initialize(sample)
    trainer.fit(batches, max_steps=STEPS)
    return _state(trainer)


@pytest.mark.parametrize("precision,micro_batches", [("fp32", 1), ("bf16", 2)])
def test_shard_threads_take_the_two_process_tp_steps_bit_for_bit(tmp_path, precision, micro_batches):
    spawn_ranks(_tp_worker, args=(free_port(), str(tmp_path), precision, micro_batches), nprocs=2)
    parts = [load_file(str(tmp_path / f"tp{r}.safetensors")) for r in range(2)]
    tp2 = {
        k: (
            torch.cat([p[k] for p in parts])
            if k != "b_pre" and not k.startswith(("losses", "auxk", "adam3"))
            else parts[0][k]
        )
        for k in parts[0]
    }
    threads = _one_process(precision, micro_batches, shard_threads=2)
    assert threads["auxk"].max() > 0, "AuxK never ran: the test would not cover it"
    assert set(threads) == set(tp2)
    for key in sorted(tp2):
        assert torch.equal(threads[key], tp2[key]), f"{key}: max diff {(threads[key] - tp2[key]).abs().max()}"
    # the plain one-process step is the same maths in another order: close, not identical
    plain = _one_process(precision, micro_batches, shard_threads=1)
    assert torch.allclose(plain["W_dec"], tp2["W_dec"], atol=1e-2)
    assert not all(torch.equal(plain[k], tp2[k]) for k in ("W_enc", "W_dec", "b_enc"))


def run_ranks(group: ThreadGroup, fn) -> tuple[dict, list]:
    """fn(rank) in one thread per rank; (results by rank, errors), a failing rank aborting the group."""
    out, errors = {}, []

    def rank(r: int) -> None:
        try:
            out[r] = fn(r)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            group.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(group.size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, errors


def test_thread_collectives_gather_in_rank_order_reduce_and_fail_together():
    group = ThreadGroup(3, timeout_s=30)

    def collectives(r: int):
        t = torch.full((2,), float(r + 1))
        return (
            group.all_gather(r, t),
            group.all_reduce_(r, t.clone()),
            group.all_reduce_(r, t.clone(), dist.ReduceOp.MAX),
        )

    out, errors = run_ranks(group, collectives)
    assert not errors
    for r in range(3):
        gathered, summed, biggest = out[r]
        assert [g[0].item() for g in gathered] == [1.0, 2.0, 3.0]
        assert summed.tolist() == [6.0, 6.0] and biggest.tolist() == [3.0, 3.0]

    def rank_2_fails(r: int):
        if r == 2:
            raise RuntimeError("rank 2 failed")
        return group.all_gather(r, torch.zeros(1))  # ranks 0 and 1 wait here until the abort

    _, errors = run_ranks(group, rank_2_fails)
    assert sorted(type(e).__name__ for e in errors) == ["BrokenBarrierError", "BrokenBarrierError", "RuntimeError"]
    group.reset()  # what ShardThreads does once its threads have left: the group works again
    out, errors = run_ranks(group, lambda r: group.all_gather(r, torch.tensor([r])))
    assert not errors and all([int(p) for p in out[r]] == [0, 1, 2] for r in range(3))


def test_shard_threads_need_one_process_and_a_tp_that_divides_the_latents():
    sae_cfg, train_cfg = _cfgs("fp32", 1)
    with pytest.raises(ValueError, match="dividing n_latents=256"):
        trainer = Trainer(TopKSAE(sae_cfg), train_cfg, shard_threads=3)
        trainer.initialize(_data()[0])
