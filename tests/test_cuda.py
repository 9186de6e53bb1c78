"""The same step on a CUDA device as on the CPU, on the same weights (skipped without a GPU: the
suite never depends on one; bench/gpu_check.sh runs these and the GPU benchmarks)."""

from __future__ import annotations

import pytest
import torch

from helpers import perturbed_sae
from saescale.core.config import SAEConfig, TrainConfig
from saescale.train.dead_latents import DeadLatentTracker
from saescale.train.precision import Precision
from saescale.train.step import SparseTopKStep
from saescale.train.trainer import Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)"),
]


def _step_on(device: str, precision: str, micro_batches: int, architecture: str = "topk"):
    extra = {"l1_coef": 0.01} if architecture == "relu" else {}
    cfg = SAEConfig(
        d_in=64,
        n_latents=4096,
        k=32,
        k_aux=32,
        normalization="none",
        aux_precision="float32",
        architecture=architecture,
        **extra,
    )
    g = torch.Generator().manual_seed(0)
    sae = perturbed_sae(cfg, g).to(device)
    with torch.no_grad():
        sae.b_enc[:300] -= 1.0
    x = torch.randn(256, 64, generator=g).to(device)
    tracker = DeadLatentTracker(cfg.n_latents, 1000, torch.device(device))
    tracker.tokens_since_fired[:300] = 1000
    step = SparseTopKStep(
        sae, 0.7, tracker, precision=Precision.make(precision, torch.device(device)), micro_batches=micro_batches
    )
    stats = step(x)
    return stats, {n: p.grad.cpu() for n, p in sae.named_parameters()}


@pytest.mark.parametrize("precision,rtol", [("fp32", 1e-3), ("bf16", 3e-2)])
def test_cuda_step_matches_the_cpu_float32_step(precision, rtol):
    ref, ref_grads = _step_on("cpu", "fp32", 1)
    stats, grads = _step_on("cuda", precision, 2)
    assert stats.loss.device.type == "cuda"
    torch.testing.assert_close(stats.loss.cpu(), ref.loss, rtol=rtol, atol=0)
    for name, g in grads.items():
        diff = (g - ref_grads[name]).norm() / ref_grads[name].norm()
        assert diff <= rtol, f"{name}: {diff:.2e}"


@pytest.mark.parametrize("architecture", ["batchtopk", "relu"])
@pytest.mark.parametrize("precision,rtol", [("fp32", 1e-3), ("bf16", 3e-2)])
def test_cuda_batchtopk_and_relu_steps_match_the_cpu_float32_step(architecture, precision, rtol):
    ref, ref_grads = _step_on("cpu", "fp32", 1, architecture)
    stats, grads = _step_on("cuda", precision, 2, architecture)
    torch.testing.assert_close(stats.loss.cpu(), ref.loss, rtol=rtol, atol=0)
    torch.testing.assert_close(stats.l0.cpu(), ref.l0, rtol=rtol, atol=0)
    for name, g in grads.items():
        diff = (g - ref_grads[name]).norm() / ref_grads[name].norm()
        assert diff <= rtol, f"{name}: {diff:.2e}"


def test_cuda_trainer_logs_and_checkpoints(tmp_path):
    cfg = SAEConfig(d_in=32, n_latents=1024, k=8)
    sae = perturbed_sae(cfg, torch.Generator().manual_seed(1)).to("cuda")
    trainer = Trainer(sae, TrainConfig(log_every=2, checkpoint_every=4), checkpoint_url=str(tmp_path / "ck"))
    data = [torch.randn(128, 32) for _ in range(4)]
    summary = trainer.fit(data)
    assert summary.steps == 4 and summary.final["loss"] == summary.final["loss"]
    assert trainer.precision.name == "bf16"
    assert (tmp_path / "ck" / "latest.json").exists()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sync_free_trainer_steps_never_wait_on_the_gpu(precision):
    """Issue 21: whole training steps (step, Adam, decoder renormalisation, EMA, dead-latent
    counters, AuxK with dead latents) under `set_sync_debug_mode("error")`: any op that makes the
    host wait for the GPU raises. tests/test_sync_free.py holds the CPU to the same rule."""
    cfg = SAEConfig(d_in=64, n_latents=4096, k=32, k_aux=32, normalization="none", dead_tokens_threshold=100_000)
    sae = perturbed_sae(cfg, torch.Generator().manual_seed(0)).to("cuda")
    trainer = Trainer(sae, TrainConfig(lr=1e-3, log_every=1000, precision=precision, ema_decay=0.99))
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(1)).to("cuda")
    trainer.train_step(x)  # the first step initialises from the data (reads on the host, once)
    assert trainer._step_fn is not None and trainer._step_fn.sync_free  # auto: on for a CUDA TopK step
    trainer.tracker.tokens_since_fired[:300] = 100_000  # dead latents for AuxK to model
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            trainer._checked_step(x)  # what `fit` runs once the host has checked the batch
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer._step_fn.last_aux_path == "fixed_block"
    assert trainer.check_loss() is None and int(trainer.tracker.dead_mask().sum()) > 0


def test_cuda_graph_steps_equal_the_eager_ones():
    """Issue 21: train.cuda_graphs=on (torch.compile, mode reduce-overhead: CUDA graphs) gives the
    eager trainer's weights after the same steps (log steps run eager in both)."""
    results = {}
    for graphs in ("off", "on"):
        cfg = SAEConfig(d_in=64, n_latents=4096, k=32, k_aux=32, normalization="none", dead_tokens_threshold=100_000)
        g = torch.Generator().manual_seed(0)
        sae = perturbed_sae(cfg, g).to("cuda")
        trainer = Trainer(sae, TrainConfig(lr=1e-3, log_every=4, precision="fp32", cuda_graphs=graphs))
        batches = [torch.randn(256, 64, generator=g).to("cuda") for _ in range(12)]
        for b in batches:
            trainer.train_step(b)
        results[graphs] = trainer
    eager, compiled = results["off"], results["on"]
    assert compiled._compiled is not None and compiled._compiled.calls == 9  # 12 steps, 3 logged
    from torch._dynamo.utils import counters

    # really replayed as CUDA graphs: inductor skips them (and says so here) for an input the
    # graph writes without a static address, among other reasons
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    for name, p in compiled.sae.named_parameters():
        torch.testing.assert_close(p, dict(eager.sae.named_parameters())[name], rtol=1e-4, atol=1e-5, msg=name)
    assert torch.equal(compiled._fire_counts, eager._fire_counts)
