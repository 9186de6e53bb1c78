"""The sparse step against the dense autograd reference, on the same weights: outputs and grads."""

from __future__ import annotations

import pytest
import torch

from helpers import perturbed_sae
from saescale.core.config import SAEConfig
from saescale.core.model import TopKSAE
from saescale.core.reference import dense_losses
from saescale.train.dead_latents import DeadLatentTracker
from saescale.train.step import SparseTopKStep


def make_sae(cfg: SAEConfig, seed: int = 0) -> TopKSAE:
    return perturbed_sae(cfg, torch.Generator().manual_seed(seed))


def run_both(
    cfg: SAEConfig, dead: torch.Tensor | None, batch: int = 64, seed: int = 0, dead_bias=None, expect_path=None
):
    sae = make_sae(cfg, seed)
    if dead_bias is not None:
        with torch.no_grad():
            sae.b_enc[dead] = dead_bias
    x = torch.randn(batch, cfg.d_in, generator=torch.Generator().manual_seed(seed + 1))
    tracker = DeadLatentTracker(cfg.n_latents, threshold_tokens=1000)
    if dead is not None:
        # latents marked dead stay dead unless they fire in this batch; the others stay alive
        tracker.tokens_since_fired[dead] = 1000
    before = tracker.tokens_since_fired.clone()
    step = SparseTopKStep(sae, mse_scale=0.7, tracker=tracker)
    stats = step(x)
    if expect_path is not None:
        assert step.last_aux_path == expect_path

    # reference: the same tracker update, then autograd through dense ops
    ref_tracker = DeadLatentTracker(cfg.n_latents, threshold_tokens=1000)
    ref_tracker.tokens_since_fired.copy_(before)
    params = {name: p.detach().clone().requires_grad_(True) for name, p in sae.named_parameters()}
    with torch.no_grad():
        pre = (x - params["b_pre"]) @ params["W_enc"].t() + params["b_enc"]
        vals, idx = pre.topk(cfg.k, dim=1)
        ref_tracker.update(idx[vals > 0], batch)
    dead_mask = ref_tracker.dead_mask()
    out = dense_losses(params, x, cfg, mse_scale=0.7, dead_mask=dead_mask if dead is not None else None)
    out["loss"].backward()
    return sae, stats, out, params


def assert_grads_match(sae, params, rtol=1e-4, atol=1e-6):
    for name, p in sae.named_parameters():
        ref = params[name].grad
        scale = ref.abs().max().item() + 1e-12
        err = (p.grad - ref).abs().max().item()
        assert err <= atol + rtol * scale * 10, f"{name}: max err {err:.3e} vs scale {scale:.3e}"


@pytest.mark.parametrize("multi_topk", [False, True])
def test_main_path_matches_dense_reference(multi_topk):
    cfg = SAEConfig(d_in=24, n_latents=256, k=8, multi_topk=multi_topk, auxk_coef=0.0, normalization="none")
    sae, stats, ref, params = run_both(cfg, dead=None)
    torch.testing.assert_close(stats.mse_loss, ref["mse_loss"].detach(), rtol=1e-5, atol=1e-7)
    if multi_topk:
        torch.testing.assert_close(stats.multi_topk_loss, ref["multi_topk_loss"].detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats.loss, ref["loss"].detach(), rtol=1e-5, atol=1e-7)
    assert_grads_match(sae, params)


@pytest.mark.parametrize(
    "n_dead,k_aux,dead_bias,path",
    [
        (40, 8, -1.0, "dense_topk"),  # dense dead block, top-k_aux selection
        (40, 32, -1.0, "dense"),  # every positive entry fits in k_aux: no top-k needed
        (120, 32, -3.0, "ragged"),  # few active entries: gathered through the sparse kernels
        (250, 4, -2.0, "sparse_topk"),  # many dead latents: top-k_aux through the sparse kernels
    ],
)
@pytest.mark.parametrize("multi_topk", [False, True])
def test_auxk_matches_dense_reference(n_dead, k_aux, dead_bias, path, multi_topk):
    cfg = SAEConfig(
        d_in=24, n_latents=256, k=8, k_aux=k_aux, multi_topk=multi_topk, normalization="none", aux_precision="float32"
    )
    dead = torch.randperm(256, generator=torch.Generator().manual_seed(3))[:n_dead]
    sae, stats, ref, params = run_both(cfg, dead=dead, dead_bias=dead_bias, expect_path=path)
    assert stats.n_dead > 0
    assert stats.auxk_loss > 0
    torch.testing.assert_close(stats.auxk_loss, ref["auxk_loss"].detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats.loss, ref["loss"].detach(), rtol=1e-5, atol=1e-7)
    assert_grads_match(sae, params)


def test_auxk_alone_moves_the_encoder():
    """With the main loss's gradient removed, AuxK must still produce encoder gradients for dead
    latents (a peer library's custom backward silently dropped them)."""
    cfg = SAEConfig(d_in=24, n_latents=256, k=8, k_aux=8, normalization="none", aux_precision="float32")
    dead = torch.arange(200, 256)
    sae = make_sae(cfg)
    x = torch.randn(64, 24)
    tracker = DeadLatentTracker(256, threshold_tokens=10)
    tracker.tokens_since_fired[dead] = 10
    step = SparseTopKStep(sae, mse_scale=0.0, tracker=tracker)  # main loss scaled to zero
    stats = step(x)
    assert stats.auxk_loss > 0
    dead_now = tracker.dead_mask()
    assert sae.W_enc.grad[dead_now].abs().sum() > 0
    assert sae.b_enc.grad[dead_now].abs().sum() > 0
    assert sae.W_enc.grad[~dead_now].abs().sum() == 0  # only dead latents get AuxK gradient


def test_bfloat16_dead_block_is_close():
    cfg32 = SAEConfig(d_in=24, n_latents=256, k=8, k_aux=8, normalization="none", aux_precision="float32")
    cfg16 = SAEConfig(d_in=24, n_latents=256, k=8, k_aux=8, normalization="none", aux_precision="bfloat16")
    dead = torch.arange(0, 40)
    sae32, stats32, _, _ = run_both(cfg32, dead=dead)
    sae16, stats16, _, _ = run_both(cfg16, dead=dead)
    torch.testing.assert_close(stats16.auxk_loss, stats32.auxk_loss, rtol=2e-2, atol=1e-6)
    for (name, p32), (_, p16) in zip(sae32.named_parameters(), sae16.named_parameters()):
        rel = (p16.grad - p32.grad).norm() / p32.grad.norm().clamp_min(1e-12)
        assert rel < 2e-2, name


@pytest.mark.parametrize(
    "n_dead,k_aux,dead_bias,path",
    [(40, 8, -1.0, "dense_topk"), (40, 32, -1.0, "dense"), (120, 32, -3.0, "ragged"), (250, 4, -2.0, "sparse_topk")],
)
def test_non_finite_auxk_loss_is_zero_and_adds_no_gradient(n_dead, k_aux, dead_bias, path):
    """One token per batch: the residual has zero variance over the batch, so AuxK's normaliser
    is 0 and its loss inf. The step must report AuxK 0 and give exactly the gradients of the
    same step without AuxK (auxk_coef=0)."""
    dead = torch.randperm(256, generator=torch.Generator().manual_seed(3))[:n_dead]
    x = torch.randn(1, 24, generator=torch.Generator().manual_seed(1))
    grads, losses = {}, {}
    for coef in (1 / 32, 0.0):
        cfg = SAEConfig(
            d_in=24, n_latents=256, k=8, k_aux=k_aux, auxk_coef=coef, normalization="none", aux_precision="float32"
        )
        sae = make_sae(cfg)
        with torch.no_grad():
            sae.b_enc[dead] = dead_bias
        tracker = DeadLatentTracker(256, threshold_tokens=1000)
        tracker.tokens_since_fired[dead] = 1000
        step = SparseTopKStep(sae, mse_scale=0.7, tracker=tracker)
        stats = step(x)
        if coef > 0:
            assert step.last_aux_path == path and stats.n_dead > 0  # AuxK really ran
            assert stats.auxk_loss.item() == 0.0
        losses[coef] = stats.loss
        grads[coef] = {name: p.grad.clone() for name, p in sae.named_parameters()}
    assert torch.isfinite(losses[1 / 32])
    torch.testing.assert_close(losses[1 / 32], losses[0.0], rtol=0, atol=0)
    for name, g in grads[0.0].items():
        torch.testing.assert_close(grads[1 / 32][name], g, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("err,var_res", [(1.0, 0.0), (0.0, 0.0), (float("nan"), 1.0)])  # inf, 0/0, NaN
def test_aux_loss_helper_zeroes_non_finite_losses(err, var_res):
    cfg = SAEConfig(d_in=4, n_latents=16, k=2, k_aux=2, normalization="none")
    step = SparseTopKStep(TopKSAE(cfg), mse_scale=1.0, tracker=DeadLatentTracker(16, threshold_tokens=10))
    aux, grad = step._aux_loss(torch.full((3, 4), err), torch.tensor(var_res))
    assert aux.item() == 0.0 and grad is None
    aux, grad = step._aux_loss(torch.ones(3, 4), torch.tensor(2.0))  # a finite loss keeps its gradient
    assert aux.item() == pytest.approx(cfg.auxk_coef / 2) and grad is not None
