"""Evaluation metrics on cases with known answers: an exact-identity SAE (NMSE 0, no downstream
loss), a mean predictor (NMSE 1), a random SAE (a real downstream loss)."""

from __future__ import annotations

import pytest
import torch

from saescale.core.config import SAEConfig
from saescale.core.model import TopKSAE
from saescale.evaluation.downstream import downstream_loss
from saescale.evaluation.reconstruction import reconstruction_metrics
from saescale.lm.models import load_causal_lm


def identity_sae(d: int) -> TopKSAE:
    """Latents +e_i and -e_i with k = d: exactly one of each pair is positive, so the TopK code
    reproduces x exactly."""
    sae = TopKSAE(SAEConfig(d_in=d, n_latents=2 * d, k=d, normalization="none"))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_pre.zero_()
    return sae


def test_identity_sae_reconstructs_exactly():
    acts = torch.randn(3000, 16) * 3 + 1
    m = reconstruction_metrics(identity_sae(16), acts, batch_size=1000)
    assert m.nmse < 1e-10 and m.fve == pytest.approx(1.0)
    assert m.l0 == pytest.approx(16.0) and m.dead_fraction == 0.0
    assert m.tokens == 3000 and len(m.density_log10) == 32
    assert m.density_log10[0] == pytest.approx(torch.log10((acts[:, 0] > 0).double().mean()).item())


def test_mean_predictor_has_nmse_one():
    acts = torch.randn(2000, 8) * torch.arange(1, 9) + 5
    sae = TopKSAE(SAEConfig(d_in=8, n_latents=32, k=4, normalization="none"))
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_pre.copy_(acts.mean(0))
    m = reconstruction_metrics(sae, acts)
    assert m.nmse == pytest.approx(1.0, rel=1e-5)


def test_downstream_loss_is_zero_for_identity_and_positive_for_a_random_sae(tiny_model_dir):
    lm = load_causal_lm(tiny_model_dir)
    d = lm.model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, lm.model.config.vocab_size, (6, 24), generator=g)
    exact = downstream_loss(lm.model, identity_sae(d), windows, "resid_post", 1, batch_size=4)
    assert exact.tokens == 6 * 23
    assert abs(exact.ce_increase) < 1e-4 and exact.kl_clean_to_spliced < 1e-6
    assert exact.ce_zero_ablation != pytest.approx(exact.ce_clean)
    assert exact.ce_recovered == pytest.approx(1.0, abs=1e-3)

    random_sae = TopKSAE(SAEConfig(d_in=d, n_latents=64, k=2, normalization="none"))
    rough = downstream_loss(lm.model, random_sae, windows, "resid_post", 1)
    assert rough.kl_clean_to_spliced > 1e-3 and rough.ce_spliced != pytest.approx(rough.ce_clean)

    keep = torch.zeros_like(windows, dtype=torch.bool)  # splice nowhere: nothing changes
    untouched = downstream_loss(lm.model, random_sae, windows, "resid_post", 1, keep_mask=keep)
    assert abs(untouched.ce_increase) < 1e-6
