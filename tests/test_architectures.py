"""BatchTopK and ReLU (the architecture registry, `saescale.core.arch`): the sparse step against
the dense autograd reference on the same weights (outputs and gradients, with AuxK, micro-batches
and bf16), their inference codes, their config refusals, and short trainings that show each
does what it is for (BatchTopK: L0 = k on average with a learned threshold; ReLU: L0 set by the
L1 coefficient), with the threshold surviving a checkpoint."""

from __future__ import annotations

import pytest
import torch

from helpers import perturbed_sae
from saescale.core.config import ConfigError, SAEConfig, TrainConfig
from saescale.core.model import TopKSAE
from saescale.core.reference import dense_losses
from saescale.core.synthetic import SparseDictionary
from saescale.formats.saved import load_sae, save_sae
from saescale.train.dead_latents import DeadLatentTracker
from saescale.train.precision import Precision
from saescale.train.step import SparseTopKStep
from saescale.train.trainer import Trainer

D, N, K, BATCH = 24, 256, 8, 50
ARCHS = {"batchtopk": {}, "relu": {"l1_coef": 0.05}}


def _cfg(architecture: str, **over) -> SAEConfig:
    base = dict(d_in=D, n_latents=N, k=K, k_aux=16, normalization="none", aux_precision="float32")
    return SAEConfig(architecture=architecture, **ARCHS[architecture], **(base | over))


def _step_and_reference(cfg: SAEConfig, micro_batches: int, precision: str):
    g = torch.Generator().manual_seed(0)
    sae = perturbed_sae(cfg, g)
    dead = torch.randperm(N, generator=g)[:40]
    with torch.no_grad():
        # BatchTopK: out of the main code, with some positive pre-activations (AuxK runs);
        # ReLU: never positive, or they would fire
        sae.b_enc[dead] -= 1.0 if cfg.architecture == "batchtopk" else 10.0
    x = torch.randn(BATCH, D, generator=g)
    tracker = DeadLatentTracker(N, 1000)
    tracker.tokens_since_fired[dead] = 1000
    before = tracker.tokens_since_fired.clone()
    step = SparseTopKStep(sae, 0.7, tracker, precision=Precision.make(precision, x.device), micro_batches=micro_batches)
    stats = step(x)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in sae.named_parameters()}
    ref_tracker = DeadLatentTracker(N, 1000)
    ref_tracker.tokens_since_fired.copy_(before)
    with torch.no_grad():
        z = sae.activation.reference_latents((x - params["b_pre"]) @ params["W_enc"].t() + params["b_enc"], cfg)
        ref_tracker.update(z.nonzero()[:, 1].unique(), BATCH)
    ref = dense_losses(params, x, cfg, 0.7, ref_tracker.dead_mask())
    ref["loss"].backward()
    return sae, stats, ref, params, tracker, ref_tracker, step


@pytest.mark.parametrize("path,fraction", [("ragged", 2.0), ("dense", 0.0)])
@pytest.mark.parametrize(
    "architecture,micro_batches,precision",
    [
        ("batchtopk", 1, "fp32"),
        ("batchtopk", 3, "fp32"),  # uneven chunks: the batch's top k*batch span them
        ("batchtopk", 3, "bf16"),  # bf16 picks candidates, float32 values decide
        ("relu", 1, "fp32"),
        ("relu", 3, "fp32"),
        ("relu", 1, "bf16"),  # ReLU's GEMM stays float32 (signs near 0 decide its code)
    ],
)
def test_step_matches_the_dense_reference(architecture, micro_batches, precision, path, fraction, monkeypatch):
    """Both ways the kept entries are decoded and back-propagated: the sparse kernels (ragged) and
    dense GEMMs (for a dense-ish code, `step.DENSE_CODE_FRACTION`), each forced here."""
    import saescale.train.step as step_module

    monkeypatch.setattr(step_module, "DENSE_CODE_FRACTION", fraction)
    cfg = _cfg(architecture)
    sae, stats, ref, params, tracker, ref_tracker, step = _step_and_reference(cfg, micro_batches, precision)
    assert step.last_main_path == path
    assert step.precision.name == ("fp32" if architecture == "relu" else precision)
    torch.testing.assert_close(stats.loss, ref["loss"].detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats.mse_loss, ref["mse_loss"].detach(), rtol=1e-5, atol=1e-7)
    # (under ReLU, AuxK's reconstruction is 0: a latent the counter calls dead has no positive
    # pre-activation in the batch, or it would have fired; its loss is a constant)
    assert stats.n_dead > 0 and stats.auxk_loss > 0
    torch.testing.assert_close(stats.auxk_loss, ref["auxk_loss"].detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats.l0, (ref["latents"] > 0).sum(1).float().mean())
    torch.testing.assert_close(tracker.tokens_since_fired, ref_tracker.tokens_since_fired)
    for name, p in sae.named_parameters():
        want = params[name].grad
        err = (p.grad - want).abs().max().item()
        assert err <= 1e-6 + 1e-4 * want.abs().max().item(), f"{name}: {err:.2e}"
    if architecture == "relu":
        assert stats.penalty_loss is not None and stats.penalty_loss > 0
        torch.testing.assert_close(stats.penalty_loss, ref["penalty_loss"].detach(), rtol=1e-5, atol=1e-7)
        assert stats.batch_threshold is None
    else:
        assert stats.l0 == K  # k * batch entries, all positive here
        kept = ref["latents"][ref["latents"] > 0]
        torch.testing.assert_close(stats.batch_threshold, kept.min())
        per_token = (ref["latents"] > 0).sum(1)
        assert per_token.min() < K < per_token.max()  # L0 varies by token: not a per-token TopK


def test_inference_codes():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, D, generator=g)
    batch = perturbed_sae(_cfg("batchtopk"), g)
    with torch.no_grad():
        batch.threshold.fill_(0.3)
        pre = batch.pre_activations(x)
        want = pre * (pre > 0.3)  # a JumpReLU at the learned threshold
        torch.testing.assert_close(batch.dense_latents(x), want)
        torch.testing.assert_close(batch(x), want @ batch.W_dec + batch.b_pre)
        # an explicit k is test-time TopK, for any architecture
        top = pre.topk(3, dim=1)
        torch.testing.assert_close(
            batch.dense_latents(x, k=3), torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
        )
    relu = perturbed_sae(_cfg("relu"), g)
    with torch.no_grad():
        pre = relu.pre_activations(x)
        torch.testing.assert_close(relu.dense_latents(x), pre.relu())
        code = relu.encode(x)
        assert code.values.shape[1] == int((pre > 0).sum(1).max())  # padded to the busiest token


def test_configs_that_cannot_train_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match="sae.architecture must be one of topk, batchtopk, relu"):
        SAEConfig(d_in=8, n_latents=32, k=4, architecture="gated")
    with pytest.raises(ConfigError, match="multi_topk is a TopK loss"):
        SAEConfig(d_in=8, n_latents=32, k=4, architecture="batchtopk", multi_topk=True)
    with pytest.raises(ConfigError, match="l1_coef is ReLU's penalty"):
        SAEConfig(d_in=8, n_latents=32, k=4, l1_coef=0.1)
    relu = TopKSAE(SAEConfig(d_in=8, n_latents=32, k=4, architecture="relu"))  # e.g. imported: evaluates
    with pytest.raises(ConfigError, match="needs sae.l1_coef > 0"):
        Trainer(relu, TrainConfig())


def _synthetic(steps: int, batch: int = 256):
    truth = SparseDictionary.random(d=D, n_atoms=128, active=4, noise=0.01, seed=3)
    g = torch.Generator().manual_seed(5)
    return truth.sample(1024, g), [truth.sample(batch, g) for _ in range(steps)], truth.sample(2048, g)


def _nmse(sae: TopKSAE, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((sae(x) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def test_batchtopk_learns_a_threshold_that_keeps_l0_near_k_and_it_survives_a_checkpoint(tmp_path):
    sample, batches, held = _synthetic(400)  # the running threshold lags the first ~300 steps
    cfg = SAEConfig(d_in=D, n_latents=N, k=K, architecture="batchtopk")
    trainer = Trainer(TopKSAE(cfg), TrainConfig(lr=3e-3, log_every=10), checkpoint_url=str(tmp_path / "ckpt"))
    trainer.initialize(sample)
    history = [m for b in batches if (m := trainer.train_step(b))]
    assert all(h["l0"] == K for h in history)  # training L0 is exactly k on average
    assert history[-1]["threshold"] > 0 and history[-1]["fvu"] < 0.5 * history[0]["fvu"]
    sae = trainer.sae
    with torch.no_grad():
        l0 = (sae.encode(held).values > 0).sum(1).float().mean().item()
    assert 0.6 * K <= l0 <= 1.6 * K, l0  # the JumpReLU at the learned threshold: L0 near k
    assert _nmse(sae, held) < 0.5
    # the threshold is saved with the weights, and restored with a checkpoint
    save_sae(sae, str(tmp_path / "sae"))
    loaded, _ = load_sae(str(tmp_path / "sae"))
    assert float(loaded.threshold) == float(sae.threshold) > 0
    trainer.save_checkpoint()
    fresh = Trainer(TopKSAE(cfg), TrainConfig(lr=3e-3), checkpoint_url=str(tmp_path / "ckpt"))
    fresh.initialize(sample)
    fresh.restore()
    assert float(fresh.sae.threshold) == float(sae.threshold)


def test_relu_l0_is_set_by_the_l1_coefficient():
    sample, batches, held = _synthetic(80)
    l0s, nmses = [], []
    for l1 in (0.02, 0.5):
        sae = TopKSAE(SAEConfig(d_in=D, n_latents=N, k=K, architecture="relu", l1_coef=l1))
        trainer = Trainer(sae, TrainConfig(lr=3e-3, log_every=1000))
        trainer.initialize(sample)
        for b in batches:
            trainer.train_step(b)
        with torch.no_grad():
            l0s.append((sae.encode(held).values > 0).sum(1).float().mean().item())
        nmses.append(_nmse(sae, held))
    assert l0s[1] < 0.5 * l0s[0], l0s  # more penalty, sparser code
    assert nmses[0] < nmses[1] < 1.0, nmses  # and the usual price in reconstruction


def test_a_dense_ragged_code_is_split_into_bounded_kernel_calls(monkeypatch):
    """A ReLU code early in training holds about half of all entries; the sparse kernels split it
    into calls of bounded entries x d (CUDA indexes them in 32 bits: an H200 faulted on 134M
    entries x 576). Forced here to a few hundred elements a call: the same step as the reference."""
    import saescale.kernels.sparse as sparse
    import saescale.train.step as step_module

    monkeypatch.setattr(sparse, "_MAX_BAG_ELEMENTS", 40 * D)
    monkeypatch.setattr(step_module, "DENSE_CODE_FRACTION", 2.0)  # the sparse kernels, not GEMMs
    cfg = _cfg("relu")
    sae, stats, ref, params, _, _, step = _step_and_reference(cfg, 1, "fp32")
    assert step.last_main_path == "ragged"
    assert stats.l0 * BATCH > 40 * 10  # the code needed many calls
    torch.testing.assert_close(stats.loss, ref["loss"].detach(), rtol=1e-5, atol=1e-7)
    for name, p in sae.named_parameters():
        want = params[name].grad
        assert (p.grad - want).abs().max().item() <= 1e-6 + 1e-4 * want.abs().max().item(), name


@pytest.mark.parametrize("rows", [64, 12])  # 12 rows x 4k candidates < the budget: the flat top-k
def test_batchtopk_candidates_hold_the_batch_top_even_where_one_token_takes_many(rows):
    """Each token offers its top 4k first; a token whose 4k-th value reaches the chunk's bound
    (token 3 here, shifted up so it holds most of the batch's top entries) offers every entry
    above it: the batch's top k x batch is always among the candidates, in row-major order."""
    from saescale.core.arch import activation

    cfg = SAEConfig(d_in=8, n_latents=512, k=4, architecture="batchtopk")
    pre = torch.randn(rows, 512, generator=torch.Generator().manual_seed(0))
    pre[3] += 10.0
    budget = 4 * 64
    cand = activation("batchtopk").candidates(pre, budget, cfg)
    flat = cand.rows * 512 + cand.latents
    assert torch.equal(flat, flat.sort().values) and flat.unique().numel() == flat.numel()
    top = pre.reshape(-1).topk(min(budget, pre.numel())).indices
    assert torch.isin(top, flat).all()
    assert (cand.rows == 3).sum() > 4 * cfg.k  # token 3 offered more than its top 4k


def test_kernel_calls_stay_bounded_and_a_wide_inference_code_decodes_in_row_chunks(monkeypatch):
    """The spans of a CSR layout never exceed the bound unless one group alone does (a group is
    never split), and `sparse_decode` of a wide code (ReLU's inference code is as wide as its
    busiest token) gives the same reconstruction in row chunks."""
    import saescale.kernels.sparse as sparse

    monkeypatch.setattr(sparse, "_MAX_BAG_ELEMENTS", 15)
    for offsets, total in (([0, 10], 20), ([0, 4, 8, 12, 30], 40), ([5, 6, 7, 20], 22)):
        spans = sparse._entry_spans(torch.tensor(offsets), total, 1)
        assert spans[0][2] == offsets[0] and spans[-1][3] == total
        assert all(a[1] == b[0] and a[3] == b[2] for a, b in zip(spans, spans[1:]))  # contiguous
        for first, end, lo, hi in spans:
            assert hi - lo <= 15 or end == first + 1
    g = torch.Generator().manual_seed(0)
    weight, idx = torch.randn(64, 3, generator=g), torch.randint(0, 64, (20, 7), generator=g)
    values = torch.rand(20, 7, generator=g)
    want = torch.zeros(20, 64).scatter_add_(1, idx, values) @ weight
    torch.testing.assert_close(sparse.sparse_decode(idx, values, weight), want)  # 20 calls of 1 row


def test_relu_trains_its_encoder_in_float32_and_the_trainer_records_it():
    sae = TopKSAE(_cfg("relu"))
    trainer = Trainer(sae, TrainConfig(precision="bf16"))
    assert trainer.precision.name == "fp32"


def test_feature_passes_take_codes_whose_width_changes_from_block_to_block(monkeypatch):
    """A ReLU or BatchTopK code is as wide as its busiest token, so blocks of rows give codes of
    different widths; the feature pages' encoder joins them (padding with zero values)."""
    import saescale.features.passes as passes

    monkeypatch.setattr(passes, "ENCODE_ELEMENTS", 7 * N)  # 7 rows a block
    sae = perturbed_sae(_cfg("relu"), torch.Generator().manual_seed(2))
    x = torch.randn(30, D, generator=torch.Generator().manual_seed(3))
    code = passes.encode_rows(sae, x)
    dense = torch.zeros(30, N).scatter_add_(1, code.indices, code.values)
    with torch.no_grad():
        torch.testing.assert_close(dense, sae.dense_latents(x))
