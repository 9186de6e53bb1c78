"""The language-model side: hooks, windows, and activations from real transformers."""

from __future__ import annotations

import pytest
import torch

from saescale.lm.activations import collect_activations, token_windows
from saescale.lm.corpus import CorpusError, iter_documents
from saescale.lm.hooks import HookError, run_to_hook


@pytest.fixture(scope="module")
def tiny_llama():
    """A tiny randomly initialised Llama (the fast path for hook tests)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


def test_resid_post_equals_hidden_states(tiny_llama):
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        hidden = tiny_llama(ids, output_hidden_states=True).hidden_states
    for layer in range(3):  # the last hidden state has the final norm applied, so stop before it
        torch.testing.assert_close(run_to_hook(tiny_llama, ids, "resid_post", layer), hidden[layer + 1])


def test_mlp_and_attention_sites(tiny_llama):
    ids = torch.randint(0, 300, (2, 16))
    captured = {}
    block = tiny_llama.model.layers[1]
    h1 = block.mlp.register_forward_hook(lambda m, i, o: captured.__setitem__("mlp", o))
    h2 = block.self_attn.register_forward_hook(lambda m, i, o: captured.__setitem__("attn", o[0]))
    with torch.no_grad():
        tiny_llama(ids)
    h1.remove(), h2.remove()
    torch.testing.assert_close(run_to_hook(tiny_llama, ids, "mlp_out", 1), captured["mlp"])
    torch.testing.assert_close(run_to_hook(tiny_llama, ids, "attn_out", 1), captured["attn"])


def test_bad_hooks(tiny_llama):
    ids = torch.randint(0, 300, (1, 8))
    with pytest.raises(HookError, match="layer 4 is out of range: the model has layers 0..3"):
        run_to_hook(tiny_llama, ids, "resid_post", 4)
    with pytest.raises(HookError, match="unknown hook site"):
        run_to_hook(tiny_llama, ids, "resid_pre", 1)


def test_empty_corpus_is_an_error(tmp_path):
    with pytest.raises(CorpusError, match="no .txt/.jsonl/.parquet files"):
        list(iter_documents(str(tmp_path)))


@pytest.fixture(scope="module")
def smollm2():
    from saescale.lm.embedded import EMBEDDED_MODEL
    from saescale.lm.models import load_causal_lm

    return load_causal_lm(EMBEDDED_MODEL)


def test_real_smollm2_activations_on_shakespeare(smollm2):
    """The embedded default end to end: windows of the real corpus through the real model; the
    collected activations equal a plain forward's hidden states for the same tokens."""
    from saescale.lm.embedded import EMBEDDED_CORPUS

    docs = list(iter_documents(EMBEDDED_CORPUS))
    assert len(docs) > 30
    acts = collect_activations(
        smollm2.model, smollm2.tokenizer, docs[:1], "resid_post", 8, 64, 2048, batch_windows=8, progress=False
    )
    assert acts.shape == (2048, 576)
    assert torch.isfinite(acts).all()
    first = next(token_windows(smollm2.tokenizer, docs[:1], 64))
    with torch.no_grad():
        hidden = smollm2.model(torch.tensor([first.ids]), output_hidden_states=True).hidden_states[9][0]
    special = set(smollm2.tokenizer.all_special_ids)
    keep = torch.tensor([t not in special for t in first.ids])
    torch.testing.assert_close(acts[: int(keep.sum())], hidden[keep], rtol=1e-4, atol=1e-4)
