"""Latent-sharded (tensor-parallel) step against the single-process step on the same weights:
losses and every gradient, with plain torch.distributed (gloo) in two processes."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from helpers import perturbed_sae, spawn_ranks
from saescale.core.config import SAEConfig
from saescale.core.model import TopKSAE
from saescale.distributed.parallel import TensorParallel
from saescale.net import free_port
from saescale.train.dead_latents import DeadLatentTracker
from saescale.train.precision import Precision
from saescale.train.step import SparseTopKStep

THRESHOLD = 1000


def _setup(cfg: SAEConfig, n_dead: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sae = perturbed_sae(cfg, g)
    dead = torch.randperm(cfg.n_latents, generator=g)[:n_dead]
    with torch.no_grad():
        sae.b_enc[dead] -= 1.0  # keep them out of the main top-k, with some positive pre-activations
    x = torch.randn(50, cfg.d_in, generator=g)  # uneven micro-batches: 25+25, 13+13+13+11
    counters = torch.zeros(cfg.n_latents, dtype=torch.long)
    counters[dead] = THRESHOLD
    return sae, x, counters


def _worker(
    rank: int,
    world: int,
    port: int,
    cfg_dict: dict,
    n_dead: int,
    out_dir: str,
    micro_batches: int = 1,
    precision: str = "fp32",
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = SAEConfig(**cfg_dict)
        full, x, counters = _setup(cfg, n_dead)
        tp = TensorParallel(rank=rank, size=world, n_global=cfg.n_latents)
        local = TopKSAE(dataclasses.replace(cfg, n_latents=tp.n_local))
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec"):
                getattr(local, name).copy_(tp.shard(getattr(full, name)))
            local.b_pre.copy_(full.b_pre)
        tracker = DeadLatentTracker(tp.n_local, THRESHOLD)
        tracker.tokens_since_fired.copy_(tp.shard(counters))
        low = Precision.make(precision, x.device)
        stats = SparseTopKStep(local, 0.7, tracker, tp, precision=low, micro_batches=micro_batches)(x)
        out = {f"grad.{n}": p.grad for n, p in local.named_parameters()}
        out.update(
            loss=stats.loss.reshape(1),
            auxk=stats.auxk_loss.reshape(1),
            multi=stats.multi_topk_loss.reshape(1),
            l0=stats.l0.reshape(1),
            penalty=(stats.penalty_loss if stats.penalty_loss is not None else torch.zeros(())).reshape(1),
            cut=(stats.batch_threshold if stats.batch_threshold is not None else torch.zeros(())).reshape(1),
            n_dead=torch.tensor([stats.n_dead]),
            counters=tracker.tokens_since_fired,
        )
        save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def _tp_and_single(tmp_path, cfg: SAEConfig, world: int, n_dead: int, micro_batches: int, precision: str):
    """The TP ranks' saved results, and the single process's step on the same weights and batch."""
    spawn_ranks(
        _worker,
        args=(world, free_port(), dataclasses.asdict(cfg), n_dead, str(tmp_path), micro_batches, precision),
        nprocs=world,
    )
    ranks = [load_file(os.path.join(tmp_path, f"rank{r}.safetensors")) for r in range(world)]
    full, x, counters = _setup(cfg, n_dead)
    tracker = DeadLatentTracker(cfg.n_latents, THRESHOLD)
    tracker.tokens_since_fired.copy_(counters)
    ref = SparseTopKStep(full, 0.7, tracker, precision=Precision.make(precision, x.device))(x)
    return ranks, full, tracker, ref


@pytest.mark.parametrize(
    "world,multi_topk,n_dead,micro_batches,precision",
    [
        (2, False, 0, 1, "fp32"),
        (2, False, 40, 1, "fp32"),
        (2, True, 40, 1, "fp32"),
        (4, False, 0, 1, "fp32"),
        (4, False, 40, 1, "fp32"),
        (4, True, 40, 1, "fp32"),
        # micro-batched TP steps (AuxK active), against the whole-batch single process
        (2, False, 40, 2, "fp32"),
        (2, False, 40, 4, "fp32"),
        (2, True, 40, 2, "fp32"),
        (2, False, 40, 4, "bf16"),  # against the single process in bf16
    ],
)
def test_tensor_parallel_step_matches_single_process(tmp_path, world, multi_topk, n_dead, micro_batches, precision):
    cfg = SAEConfig(
        d_in=24,
        n_latents=256,
        k=8,
        k_aux=16,
        multi_topk=multi_topk,
        normalization="none",
        aux_precision="float32",
        auxk_coef=1 / 32,
    )
    ranks, full, tracker, ref = _tp_and_single(tmp_path, cfg, world, n_dead, micro_batches, precision)

    # in bf16 the single process's AuxK runs its dense dead block in float32 (sae.aux_precision)
    # while the TP ranks take AuxK's top-k from the bf16 pre-activation: AuxK agrees to bf16
    aux_rtol = 1e-5 if precision == "fp32" else 1e-3
    for r in ranks:  # replicated results agree on every rank and with the single process
        torch.testing.assert_close(r["loss"][0], ref.loss, rtol=aux_rtol, atol=1e-7)
        torch.testing.assert_close(r["auxk"][0], ref.auxk_loss, rtol=aux_rtol, atol=1e-7)
        torch.testing.assert_close(r["multi"][0], ref.multi_topk_loss, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(r["l0"][0], ref.l0)
        assert int(r["n_dead"][0]) == ref.n_dead
        _grads_close(r["grad.b_pre"], full.b_pre.grad, precision, "b_pre")
    if n_dead:
        assert ref.auxk_loss > 0
    for name in ("W_enc", "b_enc", "W_dec"):
        _grads_close(torch.cat([r[f"grad.{name}"] for r in ranks]), getattr(full, name).grad, precision, name)
    torch.testing.assert_close(torch.cat([r["counters"] for r in ranks]), tracker.tokens_since_fired)


@pytest.mark.parametrize(
    "world,architecture,micro_batches,precision",
    [
        (2, "batchtopk", 1, "fp32"),
        (4, "batchtopk", 2, "fp32"),
        (2, "batchtopk", 2, "bf16"),
        (2, "relu", 2, "fp32"),
    ],
)
def test_batchtopk_and_relu_tensor_parallel_steps_match_single_process(
    tmp_path, world, architecture, micro_batches, precision
):
    """BatchTopK's batch-global cut agreed by one all-gather of each rank's top k*batch, and
    ReLU's per-rank positives, give the single process's step: losses, L0, the cut, every
    gradient and the dead counters."""
    extra = {"l1_coef": 0.05} if architecture == "relu" else {}
    cfg = SAEConfig(
        d_in=24,
        n_latents=256,
        k=8,
        k_aux=16,
        architecture=architecture,
        normalization="none",
        aux_precision="float32",
        **extra,
    )
    ranks, full, tracker, ref = _tp_and_single(tmp_path, cfg, world, 40, micro_batches, precision)
    aux_rtol = 1e-5 if precision == "fp32" else 1e-3  # AuxK's dead block: see the test above
    for r in ranks:
        torch.testing.assert_close(r["loss"][0], ref.loss, rtol=aux_rtol, atol=1e-7)
        torch.testing.assert_close(r["auxk"][0], ref.auxk_loss, rtol=aux_rtol, atol=1e-7)
        torch.testing.assert_close(r["l0"][0], ref.l0)
        if architecture == "relu":
            torch.testing.assert_close(r["penalty"][0], ref.penalty_loss, rtol=1e-5, atol=1e-7)
        else:
            torch.testing.assert_close(r["cut"][0], ref.batch_threshold)
        _grads_close(r["grad.b_pre"], full.b_pre.grad, precision, "b_pre")
    for name in ("W_enc", "b_enc", "W_dec"):
        _grads_close(torch.cat([r[f"grad.{name}"] for r in ranks]), getattr(full, name).grad, precision, name)
    torch.testing.assert_close(torch.cat([r["counters"] for r in ranks]), tracker.tokens_since_fired)


def _grads_close(got: torch.Tensor, want: torch.Tensor, precision: str, name: str) -> None:
    """Elementwise to float32 tolerance in fp32; in bf16 within 1% of the gradient's norm."""
    if precision == "fp32":
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7, msg=name)
    else:
        assert (got - want).norm() <= 1e-2 * want.norm(), name


def test_tp_size_must_divide_latents():
    with pytest.raises(ValueError, match="not divisible by tp=3"):
        TensorParallel(rank=0, size=3, n_global=256)
