"""Mixed precision and micro-batching of the training step, against the float32 dense reference
on the same weights: losses, every gradient, the selected latents; fp16's loss scale agreed
across data-parallel ranks; checkpoints record the precision and resume in another one."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from helpers import perturbed_sae, spawn_ranks
from saescale.core.config import SAEConfig, TrainConfig
from saescale.core.reference import dense_losses
from saescale.distributed.parallel import DataParallel
from saescale.net import free_port
from saescale.train.dead_latents import DeadLatentTracker
from saescale.train.precision import LossScaler, Precision, resolve_precision
from saescale.train.step import SparseTopKStep
from saescale.train.trainer import Trainer

THRESHOLD = 1000
# per precision: relative tolerance of losses, of each gradient's norm of difference, and the
# fraction of selected (token, latent) entries that must agree with float32
TOLERANCE = {"fp32": (1e-5, 1e-4, 1.0), "bf16": (1e-2, 2e-2, 0.99), "fp16": (5e-3, 1e-2, 0.99)}


def _setup(cfg: SAEConfig, n_dead: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sae = perturbed_sae(cfg, g)
    dead = torch.randperm(cfg.n_latents, generator=g)[:n_dead]
    with torch.no_grad():
        sae.b_enc[dead] -= 1.0  # out of the main top-k, with a tail of positive pre-activations
    x = torch.randn(batch, cfg.d_in, generator=g)
    counters = torch.zeros(cfg.n_latents, dtype=torch.long)
    counters[dead] = THRESHOLD
    return sae, x, counters


def _step(cfg, n_dead, batch, precision="fp32", micro_batches=1):
    sae, x, counters = _setup(cfg, n_dead, batch)
    tracker = DeadLatentTracker(cfg.n_latents, THRESHOLD)
    tracker.tokens_since_fired.copy_(counters)
    step = SparseTopKStep(sae, 0.7, tracker, precision=Precision.make(precision, x.device), micro_batches=micro_batches)
    return sae, step, step(x), x, counters


def _reference(cfg, n_dead, batch):
    sae, x, counters = _setup(cfg, n_dead, batch)
    params = {name: p.detach().clone().requires_grad_(True) for name, p in sae.named_parameters()}
    tracker = DeadLatentTracker(cfg.n_latents, THRESHOLD)
    tracker.tokens_since_fired.copy_(counters)
    with torch.no_grad():
        pre = (x - params["b_pre"]) @ params["W_enc"].t() + params["b_enc"]
        vals, idx = pre.topk(cfg.k, dim=1)
        tracker.update(idx[vals > 0], batch)
    out = dense_losses(params, x, cfg, 0.7, tracker.dead_mask())
    out["loss"].backward()
    return out, params, idx


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("n_dead", [0, 200, 3000])  # no AuxK, AuxK dense block, AuxK sparse top-k
def test_low_precision_step_matches_the_float32_reference(precision, n_dead):
    cfg = SAEConfig(d_in=64, n_latents=4096, k=32, k_aux=32, normalization="none", aux_precision="auto")
    loss_tol, grad_tol, agree_min = TOLERANCE[precision]
    sae, step, stats, x, _ = _step(cfg, n_dead, batch=256, precision=precision)
    ref, params, ref_idx = _reference(cfg, n_dead, batch=256)
    assert not stats.overflow
    assert step.compute_dtype == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    torch.testing.assert_close(stats.mse_loss, ref["mse_loss"].detach(), rtol=loss_tol, atol=0)
    if n_dead:
        assert stats.auxk_loss > 0
        # (AuxK's dead block runs in bf16 by default even in fp32 training on a bf16-native CPU)
        torch.testing.assert_close(stats.auxk_loss, ref["auxk_loss"].detach(), rtol=max(5 * loss_tol, 1e-3), atol=0)
    for name, p in sae.named_parameters():
        assert _rel(p.grad, params[name].grad) <= grad_tol, f"{precision} grad of {name}"

    # the selected latents: float32 re-ranking of the low-precision candidates
    with torch.no_grad():
        step.refresh_low_precision_()
        xc = x - sae.b_pre
        _, idx = step.select(step.encode_chunk(xc), xc, cfg.k)
    hits = (idx.sort(1).values[:, :, None] == ref_idx[:, None, :]).any(2).float().mean().item()
    assert hits >= agree_min, f"{precision}: {hits:.4f} of selected latents agree with float32"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(
    "n_dead,multi_topk,aux_path",
    [(0, False, "none"), (200, False, "dense_topk"), (3000, False, "sparse_topk"), (200, True, "dense_topk")],
)
def test_micro_batches_give_the_batch_level_step(precision, n_dead, multi_topk, aux_path):
    cfg = SAEConfig(
        d_in=48, n_latents=4096, k=16, k_aux=32, multi_topk=multi_topk, normalization="none", aux_precision="auto"
    )
    batch = 250  # 4 micro-batches of 63, 63, 63 and 61 rows
    results = {m: _step(cfg, n_dead, batch=batch, precision=precision, micro_batches=m) for m in (1, 2, 4)}
    sae1, step1, s1, _, _ = results[1]
    assert step1.last_aux_path == aux_path
    for m in (2, 4):
        sae, step, s, _, _ = results[m]
        assert step.last_aux_path == aux_path
        assert step._pre.shape[0] == -(-batch // m)  # only a micro-batch of pre-activations is held
        for field in ("loss", "mse_loss", "auxk_loss", "multi_topk_loss", "l0", "fvu"):
            torch.testing.assert_close(getattr(s, field), getattr(s1, field), rtol=1e-5, atol=1e-8)
        assert s.n_dead == s1.n_dead
        assert torch.equal(s.fire_counts, s1.fire_counts)
        torch.testing.assert_close(step.tracker.tokens_since_fired, step1.tracker.tokens_since_fired)
        for (name, p), q in zip(sae.named_parameters(), sae1.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=f"mb={m} grad {name}")
    if n_dead:
        assert s1.auxk_loss > 0


def test_micro_batches_must_be_a_positive_integer():
    cfg = SAEConfig(d_in=8, n_latents=64, k=4)
    sae, _, _ = _setup(cfg, 0, 8)
    with pytest.raises(ValueError, match="micro_batches must be an integer >= 1"):
        SparseTopKStep(sae, 1.0, DeadLatentTracker(64, THRESHOLD), micro_batches=0)


def test_auto_precision_follows_the_hardware():
    cpu = torch.device("cpu")
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    assert resolve_precision("fp16", cpu) == "fp16"
    with pytest.raises(ValueError, match="train.precision must be one of"):
        resolve_precision("fp8", cpu)


def test_loss_scaler_halves_on_overflow_and_grows_after_clean_steps():
    scaler = LossScaler(scale=1024.0, growth_interval=3)
    scaler.update(True)
    assert scaler.scale == 512.0 and scaler.skipped_steps == 1
    for _ in range(2):
        scaler.update(False)
    assert scaler.scale == 512.0
    scaler.update(False)
    assert scaler.scale == 1024.0 and scaler.clean_steps == 0


def test_fp16_overflow_is_flagged_and_the_bf16_step_is_not():
    """A pre-activation past fp16's range (65504) overflows there; bf16 has float32's range."""
    cfg = SAEConfig(d_in=32, n_latents=512, k=8, normalization="none")
    for precision, expect in (("fp16", True), ("bf16", False)):
        sae, x, _ = _setup(cfg, 0, 16)
        step = SparseTopKStep(
            sae, 1.0, DeadLatentTracker(512, THRESHOLD), precision=Precision.make(precision, x.device)
        )
        assert step(x * 1e6).overflow is expect
        assert step(x).overflow is False


def _dp_overflow_worker(rank: int, port: int, out_dir: str) -> None:
    """Two data-parallel fp16 replicas; rank 1's second batch overflows fp16."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg = SAEConfig(d_in=32, n_latents=512, k=8, normalization="none")
        sae, _, _ = _setup(cfg, 0, 16)
        trainer = Trainer(sae, TrainConfig(precision="fp16", lr=1e-3, log_every=1), dp=DataParallel(rank, 2))
        g = torch.Generator().manual_seed(10 + rank)
        batches = [torch.randn(16, 32, generator=g) for _ in range(3)]
        if rank == 1:
            batches[1] = batches[1] * 1e6
        scales, weights = [], []
        for b in batches:
            weights.append(sae.W_enc.detach().clone())
            trainer.train_step(b)
            scales.append(trainer.precision.scale)
        weights.append(sae.W_enc.detach().clone())
        save_file(
            {
                "scales": torch.tensor(scales),
                "changed": torch.tensor([not torch.equal(a, b) for a, b in zip(weights, weights[1:])]),
                "skipped": torch.tensor([trainer.precision.scaler.skipped_steps]),
                "W_enc": sae.W_enc.detach().contiguous(),
            },
            os.path.join(out_dir, f"rank{rank}.safetensors"),
        )
    finally:
        dist.destroy_process_group()


def test_fp16_overflow_on_one_replica_skips_the_step_on_every_replica(tmp_path):
    spawn_ranks(_dp_overflow_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    ranks = [load_file(os.path.join(tmp_path, f"rank{r}.safetensors")) for r in range(2)]
    for r in ranks:
        assert r["changed"].tolist() == [True, False, True]  # step 2 skipped on both replicas
        assert r["scales"].tolist() == [2.0**16, 2.0**15, 2.0**15]  # halved alike, no communication
        assert int(r["skipped"][0]) == 1
    torch.testing.assert_close(ranks[0]["W_enc"], ranks[1]["W_enc"], rtol=0, atol=0)  # replicas still agree


def _train(tmp_path, precision: str, steps: int, data: list[torch.Tensor], resume: bool = False) -> Trainer:
    cfg = SAEConfig(d_in=32, n_latents=1024, k=8)
    sae, _, _ = _setup(cfg, 0, 8)
    trainer = Trainer(
        sae,
        TrainConfig(precision=precision, lr=2e-3, checkpoint_every=3, log_every=1),
        checkpoint_url=str(tmp_path / "ckpt"),
    )
    if resume:
        trainer.restore()
    trainer.fit(data, max_steps=steps)
    return trainer


def test_checkpoint_records_the_precision_and_resumes_in_another(tmp_path):
    g = torch.Generator().manual_seed(3)
    data = [torch.randn(128, 32, generator=g) for _ in range(6)]
    first = _train(tmp_path, "bf16", 3, data[:3])
    latest = json.loads((tmp_path / "ckpt" / "latest.json").read_text())
    meta_path = next((tmp_path / "ckpt").rglob("meta.json"))
    meta = json.loads(meta_path.read_text())
    assert latest and first.step == 3
    assert meta["trainer"]["precision"] == "bf16" and meta["trainer"]["loss_scale"] is None
    resumed = _train(tmp_path, "fp32", 6, data[3:], resume=True)
    assert resumed.step == 6 and resumed.precision.name == "fp32"
    assert math.isfinite(resumed.summary.final["loss"])


def test_fp16_checkpoint_keeps_the_loss_scale(tmp_path):
    g = torch.Generator().manual_seed(4)
    data = [torch.randn(128, 32, generator=g) for _ in range(4)]
    data[1] = data[1] * 1e6  # one fp16 overflow: the scale halves
    first = _train(tmp_path, "fp16", 3, data[:3])
    assert first.precision.scale == 2.0**15 and first.precision.scaler.skipped_steps == 1
    resumed = _train(tmp_path, "fp16", 4, data[3:], resume=True)
    assert resumed.precision.scale == 2.0**15 and resumed.precision.scaler.skipped_steps == 1


def test_bf16_training_reaches_the_float32_nmse(tmp_path):
    """The quality bar of the issue at test scale: same data, seed and steps; held-out NMSE within
    1% (relative) of float32, and the same dead fraction."""
    from saescale.core.synthetic import SparseDictionary

    source = SparseDictionary.random(d=64, n_atoms=512, active=8, seed=0)
    train = list(source.batches(512, 120))
    heldout = source.sample(2048, torch.Generator().manual_seed(99))
    result = {}
    for precision in ("fp32", "bf16"):
        cfg = SAEConfig(d_in=64, n_latents=1024, k=16)
        sae, _, _ = _setup(cfg, 0, 8)
        trainer = Trainer(sae, TrainConfig(precision=precision, lr=4e-3, log_every=10))
        trainer.fit(train)
        with torch.no_grad():
            x_hat = sae(heldout)
        nmse = float((x_hat - heldout).pow(2).sum() / (heldout - heldout.mean(0)).pow(2).sum())
        result[precision] = (nmse, trainer.summary.final["dead_fraction"])
    (fp32_nmse, fp32_dead), (bf16_nmse, bf16_dead) = result["fp32"], result["bf16"]
    assert fp32_nmse < 0.4  # it trained (about 1 at init)
    print("nmse and dead fraction by precision:", result)
    assert abs(bf16_nmse - fp32_nmse) / fp32_nmse <= 0.01, result
    assert bf16_dead == fp32_dead, result


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_cpu_low_precision_gemm_runs_in_blocks_with_the_same_bits(precision):
    """On CPU a bf16/fp16 GEMM makes a float32 temporary as large as its output (2 GiB at 128
    rows x 2^22 latents, measured); above CPU_LOWP_GEMM_ELEMS outputs the encoder GEMM runs in
    blocks of latents. Here 256 rows x 2^17 latents (2 blocks): the same bits as one GEMM."""
    from saescale.distributed.plan import CPU_LOWP_GEMM_ELEMS

    cfg = SAEConfig(d_in=8, n_latents=2**17, k=4)
    sae = perturbed_sae(cfg, torch.Generator().manual_seed(0))
    step = SparseTopKStep(sae, 1.0, DeadLatentTracker(cfg.n_latents, 10**9), precision=Precision.make(precision, "cpu"))
    xc = torch.randn(256, 8, generator=torch.Generator().manual_seed(1))
    assert 256 * cfg.n_latents > CPU_LOWP_GEMM_ELEMS  # blocks
    with torch.no_grad():  # as in the step
        step.refresh_low_precision_()
        blocked = step.encode_chunk(xc).clone()
        x_low = torch.cat([xc, torch.ones(256, 1)], dim=1).to(Precision.make(precision, "cpu").dtype)
        assert torch.equal(blocked, torch.mm(x_low, step._w_enc_low.t()))
