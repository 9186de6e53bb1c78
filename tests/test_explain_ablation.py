"""N2G explanations and ablation sparsity on cases with known answers: planted latents whose firing
rule is known exactly, hand-built logit differences, and ablations of latents that cannot matter."""

from __future__ import annotations

import math

import pytest
import torch

from saescale.core.config import SAEConfig
from saescale.core.model import TopKSAE
from saescale.evaluation.ablation import ablation_sparsity, effect_sparsity
from saescale.evaluation.explain import (
    WILDCARD,
    Explanation,
    build_explanation,
    latent_activation_fn,
    latent_codes,
    score_explanation,
)
from saescale.lm.hooks import run_to_hook
from saescale.lm.models import load_causal_lm

A, B, C, PAD, VOCAB = 3, 5, 7, 0, 8


def planted(rule):
    """An activation function [b, seq] -> [b, seq] from a per-position rule(tokens, t) -> float."""

    def fn(ids: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[rule(row, t) for t in range(len(row))] for row in ids.tolist()], dtype=torch.float)

    return fn


def after_a(row, t):  # fires on B right after A
    return 2.0 if row[t] == B and t > 0 and row[t - 1] == A else 0.0


def two_after_a(row, t):  # fires on B two tokens after A, whatever lies between
    return 1.5 if row[t] == B and t > 1 and row[t - 2] == A else 0.0


def on_c(row, t):
    return 1.0 if row[t] == C else 0.0


def random_text(n: int, seq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (n, seq), generator=g)  # never the padding token


def examples_of(rule, text: torch.Tensor, count: int = 6) -> list[list[int]]:
    """Sequences ending at the first `count` firing positions."""
    out = []
    for row in text.tolist():
        for t in range(len(row)):
            if rule(row, t) > 0 and len(out) < count:
                out.append(row[: t + 1])
    return out


@pytest.mark.parametrize("rule, pattern", [(after_a, (B, A)), (two_after_a, (B, WILDCARD, A)), (on_c, (C,))])
def test_n2g_recovers_a_planted_rule_with_perfect_precision_and_recall(rule, pattern):
    fn = planted(rule)
    explanation = build_explanation(fn, examples_of(rule, random_text(40, 32, seed=1)), PAD, max_context=8)
    assert {p for p, _ in explanation.patterns} == {pattern}
    held_out = random_text(60, 32, seed=2)
    precision, recall, f1, firings = score_explanation(explanation, held_out, fn(held_out))
    assert firings > 10 and (precision, recall, f1) == (1.0, 1.0, 1.0)


def test_n2g_predict_walks_backwards_through_wildcards_and_scores_misses():
    explanation = Explanation()
    explanation.add((B, WILDCARD, A), 1.5)
    assert explanation.predict([A, 9, B, B, A, B]) == [0.0, 0.0, 1.5, 0.0, 0.0, 0.0]
    assert explanation.describe(lambda t: f"t{t}") == ["t3|*|t5  (1.5)"]
    # an explanation of the wrong rule: predicted firings that do not happen and real ones missed
    text = random_text(60, 32, seed=3)
    precision, recall, _, _ = score_explanation(explanation, text, planted(after_a)(text))
    assert precision < 0.2 and recall < 0.2
    # a latent that never fires on the test text: recall is undefined (NaN), not 0 or 1
    _, recall, _, firings = score_explanation(explanation, text, torch.zeros(text.shape))
    assert firings == 0 and math.isnan(recall)


def test_real_activation_fn_matches_the_sae_on_captured_activations(tiny_model_dir):
    lm = load_causal_lm(tiny_model_dir)
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=lm.model.config.hidden_size, n_latents=64, k=4, normalization="none"))
    ids = torch.randint(10, 1000, (3, 12))
    h = run_to_hook(lm.model, ids, "resid_post", 1).float().reshape(-1, sae.cfg.d_in)
    dense = sae.dense_latents(h).reshape(3, 12, 64)
    values, indices = latent_codes(lm.model, sae, ids, "resid_post", 1)
    fired = indices[values > 0].unique()
    for latent in fired[:5].tolist():
        got = latent_activation_fn(lm.model, sae, "resid_post", 1, latent)(ids)
        torch.testing.assert_close(got, dense[..., latent])


def test_effect_sparsity_formula_on_known_vectors():
    delta = torch.zeros(4, 10)
    delta[2, 7] = -3.0  # one logit of one position: the sparsest effect there is
    assert effect_sparsity(delta) == pytest.approx(1 / 40)
    delta[0, 1] = 3.0  # two equal-magnitude entries: (2|c| / (sqrt(2)|c|))^2 = 2
    assert effect_sparsity(delta) == pytest.approx(2 / 40)
    assert math.isnan(effect_sparsity(torch.full((4, 10), 0.5)))  # a constant shift changes nothing
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(16, 5000, generator=g, dtype=torch.float64)
    assert effect_sparsity(dense) == pytest.approx(2 / math.pi, rel=0.02)  # Gaussian: E|v|^2/E v^2
    with pytest.raises(ValueError, match="positions, vocab"):
        effect_sparsity(torch.zeros(5))


def test_ablation_sparsity_through_a_real_model(tiny_model_dir):
    lm = load_causal_lm(tiny_model_dir)
    d = lm.model.config.hidden_size
    # latents +e_i and -e_i (k = d: one of each pair is active); the -e_i latents decode to zero,
    # so ablating them changes nothing: exactly those pairs are skipped
    sae = TopKSAE(SAEConfig(d_in=d, n_latents=2 * d, k=d, normalization="none"))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, torch.zeros(d, d)]))
        sae.b_enc.zero_()
        sae.b_pre.zero_()
    windows = torch.randint(10, 2000, (2, 24), generator=torch.Generator().manual_seed(0))
    positions = [(0, 3), (1, 10)]
    result = ablation_sparsity(lm.model, sae, windows, "resid_post", 1, positions, horizon=8)
    h = run_to_hook(lm.model, windows, "resid_post", 1).float()
    negatives = sum(int((h[w, p] < 0).sum()) for w, p in positions)
    positives = sum(int((h[w, p] > 0).sum()) for w, p in positions)
    assert result.skipped == negatives and result.pairs == positives
    assert 1 / (8 * lm.model.config.vocab_size) <= result.mean <= 1.0
    again = ablation_sparsity(lm.model, sae, windows, "resid_post", 1, positions, horizon=8)
    assert again.mean == result.mean
    with pytest.raises(ValueError, match="horizon"):
        ablation_sparsity(lm.model, sae, windows, "resid_post", 1, positions, horizon=0)
