"""The Triton sparse kernels (`kernels.triton_sparse`) on this CPU through Triton's interpreter
(TRITON_INTERPRET=1, set before triton is imported): each product against the embedding_bag
kernels and a dense reference on the same tensors, and a whole TopK step with
`kernels="triton"` against the torch step and the dense autograd reference (outputs and every
gradient). The GPU timings are `saescale bench kernels --device cuda` (bench/gpu_check.sh)."""

from __future__ import annotations

import os

import torch

# on a CPU, Triton's interpreter (set before triton is imported: kernels run as numpy); on a
# GPU machine (bench/gpu_check.sh runs this file in a process of its own) the compiled kernels
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from helpers import perturbed_sae  # noqa: E402
from saescale.core.config import SAEConfig  # noqa: E402
from saescale.core.reference import dense_losses  # noqa: E402
from saescale.kernels import sparse  # noqa: E402
from saescale.kernels import triton_sparse as ts  # noqa: E402
from saescale.kernels.ops import sparse_ops  # noqa: E402
from saescale.train.dead_latents import DeadLatentTracker  # noqa: E402
from saescale.train.step import SparseTopKStep  # noqa: E402


def _code(batch: int, k: int, n: int, d: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(batch)])
    idx[0, 0] = n - 1  # the last latent is touched (an off-by-one in the offsets shows)
    val = torch.randn(batch, k, generator=g)
    weight = torch.randn(n, d, generator=g).to(dtype)
    dense = torch.randn(batch, d, generator=g).to(dtype)
    return idx.to(DEVICE), val.to(DEVICE), weight.to(DEVICE), dense.to(DEVICE)


def _dense_code(idx: torch.Tensor, val: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(idx.shape[0], n, device=idx.device).scatter_(1, idx, val)


# d not a multiple of the 128-column block; k not a power of two; more latents than entries
SIZES = [(8, 3, 40, 200), (16, 8, 64, 128), (5, 16, 300, 33)]


@pytest.mark.parametrize("batch,k,n,d", SIZES)
def test_decode_matches_embedding_bag_and_the_dense_product(batch, k, n, d):
    idx, val, weight, _ = _code(batch, k, n, d)
    out = ts.decode(idx, val, weight)
    torch.testing.assert_close(out, sparse.sparse_decode(idx, val, weight), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, _dense_code(idx, val, n) @ weight, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch,k,n,d", SIZES)
def test_values_grad_matches_embedding_bag_and_the_dense_product(batch, k, n, d):
    idx, _, weight, dense = _code(batch, k, n, d)
    out = ts.values_grad(idx, weight, dense)
    torch.testing.assert_close(out, sparse.values_grad(idx, weight, dense), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out, (dense @ weight.t()).gather(1, idx), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("batch,k,n,d", SIZES)
def test_rows_by_latent_matches_embedding_bag_and_the_dense_product(batch, k, n, d, accumulate):
    idx, val, _, dense = _code(batch, k, n, d)
    order = sparse.LatentOrder(idx, n)
    start = torch.randn(n, d, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    out = ts.rows_by_latent_order_(start.clone(), order, val, dense, accumulate=accumulate)
    ref = sparse.rows_by_latent_(start.clone(), order, val, dense, accumulate=accumulate)
    dense_ref = _dense_code(idx, val, n).t() @ dense + (start if accumulate else 0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, dense_ref, rtol=1e-5, atol=1e-5)
    untouched = torch.ones(n, dtype=torch.bool, device=DEVICE)
    untouched[idx.reshape(-1)] = False
    if accumulate:  # rows of latents with no entry are left exactly as they were
        assert torch.equal(out[untouched], start[untouched])
    else:
        assert bool((out[untouched] == 0).all())


def test_low_precision_tensors_accumulate_in_float32():
    idx, val, weight, dense = _code(16, 8, 64, 96, dtype=torch.bfloat16)
    out = ts.decode(idx, val, weight)
    assert out.dtype == torch.bfloat16
    ref = _dense_code(idx, val, 64) @ weight.float()
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=2e-2)


def test_bad_arguments_are_named():
    idx, val, weight, dense = _code(4, 2, 16, 8)
    order = sparse.LatentOrder(idx, 16)
    with pytest.raises(ValueError, match="offsets has 17 entries for 15 latents"):
        ts.rows_by_latent_(torch.zeros(15, 8, device=DEVICE), order.offsets, order.rows, val.reshape(-1), dense)
    with pytest.raises(ValueError, match="contiguous rows"):
        ts.decode(idx, val, weight.t())
    with pytest.raises(ValueError, match="auto, torch or triton"):
        sparse_ops("cuda")


@pytest.mark.parametrize("n_dead", [0, 30])
def test_a_step_with_triton_kernels_matches_the_torch_step_and_the_dense_reference(n_dead):
    cfg = SAEConfig(d_in=24, n_latents=128, k=4, k_aux=8, normalization="none", aux_precision="float32")
    x = torch.randn(16, 24, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    dead = torch.arange(n_dead)
    results = {}
    for kernels in ("torch", "triton"):
        sae = perturbed_sae(cfg, torch.Generator().manual_seed(0))
        with torch.no_grad():
            sae.b_enc[dead] -= 1.0
        sae = sae.to(DEVICE)
        tracker = DeadLatentTracker(cfg.n_latents, 1000, torch.device(DEVICE))
        tracker.tokens_since_fired[dead] = 1000
        step = SparseTopKStep(sae, 0.7, tracker, sync_free=True, kernels=kernels)
        assert step.ops.name == kernels
        results[kernels] = (step(x), {name: p.grad.clone() for name, p in sae.named_parameters()})
    (stats, grads), (ref_stats, ref_grads) = results["triton"], results["torch"]
    torch.testing.assert_close(stats.loss, ref_stats.loss, rtol=1e-6, atol=0)
    assert torch.equal(stats.fire_counts, ref_stats.fire_counts)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)

    # and the dense autograd reference on the same weights
    sae = perturbed_sae(cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc[dead] -= 1.0
    sae = sae.to(DEVICE)
    params = {name: p.detach().clone().requires_grad_(True) for name, p in sae.named_parameters()}
    tracker = DeadLatentTracker(cfg.n_latents, 1000, torch.device(DEVICE))
    tracker.tokens_since_fired[dead] = 1000
    tracker.update_mask(stats.fire_counts > 0, x.shape[0])
    out = dense_losses(params, x, cfg, mse_scale=0.7, dead_mask=tracker.dead_mask() if n_dead else None)
    out["loss"].backward()
    torch.testing.assert_close(stats.loss, out["loss"].detach(), rtol=1e-5, atol=1e-7)
    for name, g in grads.items():
        torch.testing.assert_close(g, params[name].grad, rtol=1e-4, atol=1e-6, msg=name)
