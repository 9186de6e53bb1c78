"""dp x tp training against the single-process trainer on the same data and seed: the loss of
every logged step and the final weights agree to float tolerance (gloo, plain torch.distributed;
the Ray Train job runs this same per-rank loop)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from helpers import spawn_ranks
from saescale.core.config import SAEConfig, TrainConfig
from saescale.core.model import TopKSAE
from saescale.core.synthetic import SparseDictionary
from saescale.distributed.mesh import ParallelDims
from saescale.formats.saved import load_sae
from saescale.net import free_port
from saescale.train.checkpoint import StorageCheckpointer, export_gathered, step_dir
from saescale.train.rank_setup import build_rank_trainer, local_share
from saescale.train.trainer import Trainer

STEPS, BATCH = 12, 64


def _cfgs(architecture: str = "topk") -> tuple[SAEConfig, TrainConfig]:
    # a low dead threshold so AuxK runs (and must agree) in the later steps
    sae = SAEConfig(
        d_in=16,
        n_latents=128,
        k=4,
        k_aux=8,
        dead_tokens_threshold=3 * BATCH,
        aux_precision="float32",
        multi_topk=False,
        architecture=architecture,
    )
    train = TrainConfig(
        lr=3e-3, log_every=1, histogram_every=1000, seed=7, clip_grad_norm=5.0, ema_decay=0.9, precision="fp32"
    )
    return sae, train


def _data() -> tuple[torch.Tensor, list[torch.Tensor]]:
    truth = SparseDictionary.random(d=16, n_atoms=64, active=3, noise=0.01, seed=3)
    g = torch.Generator().manual_seed(11)
    return truth.sample(512, g), [truth.sample(BATCH, g) for _ in range(STEPS)]


def _worker(rank: int, dp: int, tp: int, port: int, out_dir: str, architecture: str = "topk") -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=dp * tp)
    try:
        sae_cfg, train_cfg = _cfgs(architecture)
        dims = ParallelDims(dp=dp, tp=tp)
        trainer = build_rank_trainer(sae_cfg, train_cfg, dims, rank)
        trainer.initialize(_data()[0])
        summary = trainer.fit(
            (local_share(b, dims, rank) for b in _data()[1]),
            max_steps=STEPS,
            checkpointer=StorageCheckpointer(os.path.join(out_dir, "ckpt")),
        )
        dp_rank, tp_rank = dims.coords(rank)
        out = {n: p.detach() for n, p in trainer.sae.named_parameters()}
        out["losses"] = torch.tensor([h["loss"] for h in summary.history], dtype=torch.float64)
        out["auxk"] = torch.tensor([h["auxk_loss"] for h in summary.history], dtype=torch.float64)
        out["dead"] = trainer.tracker.tokens_since_fired
        out["tokens"] = torch.tensor([trainer.tokens_seen])
        out["threshold"] = trainer.sae.threshold.reshape(1)
        save_file(
            {k: v.contiguous() for k, v in out.items()}, os.path.join(out_dir, f"dp{dp_rank}tp{tp_rank}.safetensors")
        )
    finally:
        dist.destroy_process_group()


def _single_process(architecture: str = "topk") -> tuple[Trainer, list[dict]]:
    sae_cfg, train_cfg = _cfgs(architecture)
    trainer = Trainer(TopKSAE(sae_cfg), train_cfg)
    sample, batches = _data()
    trainer.initialize(sample)
    history = [trainer.train_step(b) for b in batches]
    return trainer, history


@pytest.mark.parametrize("dp,tp,architecture", [(1, 2, "topk"), (2, 1, "topk"), (2, 2, "topk"), (2, 2, "batchtopk")])
def test_parallel_run_matches_single_process(tmp_path, dp, tp, architecture):
    """BatchTopK too: its top k*batch spans the replicas' shares of the batch and the TP shards,
    and its learned threshold is the single process's on every rank and in the gathered export."""
    spawn_ranks(_worker, args=(dp, tp, free_port(), str(tmp_path), architecture), nprocs=dp * tp)
    ref, history = _single_process(architecture)
    ref_losses = torch.tensor([h["loss"] for h in history], dtype=torch.float64)
    assert max(h["auxk_loss"] for h in history) > 0, "AuxK never ran: the test would not cover it"
    for dp_rank in range(dp):
        shards = [load_file(os.path.join(tmp_path, f"dp{dp_rank}tp{t}.safetensors")) for t in range(tp)]
        torch.testing.assert_close(shards[0]["losses"], ref_losses, rtol=2e-4, atol=1e-6)
        torch.testing.assert_close(
            shards[0]["auxk"],
            torch.tensor([h["auxk_loss"] for h in history], dtype=torch.float64),
            rtol=2e-3,
            atol=1e-6,
        )
        assert int(shards[0]["tokens"][0]) == STEPS * BATCH
        for name in ("W_enc", "b_enc", "W_dec"):
            torch.testing.assert_close(
                torch.cat([s[name] for s in shards]), getattr(ref.sae, name).detach(), rtol=1e-3, atol=2e-5
            )
        torch.testing.assert_close(shards[0]["b_pre"], ref.sae.b_pre.detach(), rtol=1e-3, atol=2e-5)
        torch.testing.assert_close(torch.cat([s["dead"] for s in shards]), ref.tracker.tokens_since_fired)
        for shard in shards:
            torch.testing.assert_close(shard["threshold"][0], ref.sae.threshold, rtol=1e-5, atol=1e-7)
    if architecture == "batchtopk":
        assert float(ref.sae.threshold) > 0

    # the per-rank checkpoint, gathered shard by shard into one saved SAE, is the reference's
    # evaluation SAE (its bias-corrected EMA)
    gathered, _ = load_sae(export_gathered(str(tmp_path / "ckpt" / step_dir(STEPS)), str(tmp_path / "sae")))
    ema = ref.eval_weights()
    for name in ("W_enc", "b_enc", "W_dec", "b_pre"):
        torch.testing.assert_close(getattr(gathered, name), ema[name], rtol=1e-3, atol=2e-5)
    torch.testing.assert_close(gathered.threshold, ref.sae.threshold, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(ema["W_dec"], ref.sae.W_dec)  # the EMA is not the raw weights


def test_layout_errors_name_the_knob():
    from saescale.distributed.mesh import MeshError

    with pytest.raises(MeshError, match="multiple of parallel.tp=3"):
        ParallelDims.from_world(4, 3)
    with pytest.raises(MeshError, match="not divisible by parallel.tp=3"):
        ParallelDims(dp=1, tp=3).validate(256, 3)
    with pytest.raises(MeshError, match="batch_size=100 must be divisible by the worker count 8"):
        ParallelDims(dp=2, tp=4).validate(256, 100)
