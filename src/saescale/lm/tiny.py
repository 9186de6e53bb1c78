"""A tiny randomly initialised Llama with the embedded default's real tokenizer, saved as a local
model directory: a real transformer of any width for tests and benchmarks (e.g. the 2^24-latent
run at d_model=16, where the SAE's weights must fit a laptop). It stands in for a Hugging Face id
exactly as a user's local model folder does."""

from __future__ import annotations


def save_tiny_llama(path: str, hidden_size: int = 48, layers: int = 3, seed: int = 0) -> str:
    """Write the model and tokenizer to `path` (a folder); returns it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from saescale.lm.embedded import EMBEDDED_MODEL
    from saescale.lm.models import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(EMBEDDED_MODEL))
    heads = max(1, hidden_size // 12)  # 4 heads (2 KV) at the tests' width of 48
    while hidden_size % heads:
        heads -= 1
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=256,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
