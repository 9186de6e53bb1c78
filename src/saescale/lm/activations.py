"""Run a causal LM over text in fixed-length windows and collect activations at a hook site."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from saescale.lm.hooks import run_to_hook


@dataclass
class TokenWindow:
    doc_id: str
    start: int  # position of the window's first token in its document
    ids: list[int]


def token_windows(tokenizer, documents: Iterable[tuple[str, str]], context_length: int) -> Iterator[TokenWindow]:
    """Each document tokenised once and cut into consecutive windows of `context_length` tokens
    (the paper's 64); a BOS token, when the tokenizer has one, starts every window."""
    bos = getattr(tokenizer, "bos_token_id", None)
    body = context_length - (1 if bos is not None else 0)
    for doc_id, text in documents:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - body + 1, body):
            chunk = ids[start : start + body]
            yield TokenWindow(doc_id, start, ([bos] if bos is not None else []) + chunk)


def collect_activations(
    model: torch.nn.Module,
    tokenizer,
    documents: Iterable[tuple[str, str]],
    site: str,
    layer: int,
    context_length: int,
    max_tokens: int,
    batch_windows: int = 16,
    drop_special: bool = True,
    progress: bool = True,
) -> torch.Tensor:
    """[n_tokens, d_model] float32 activations of up to `max_tokens` kept tokens, in corpus order."""
    special = torch.tensor(sorted(set(getattr(tokenizer, "all_special_ids", []) or [])), dtype=torch.long)
    kept: list[torch.Tensor] = []
    total = 0
    bar = tqdm(total=max_tokens, unit="tok", desc=f"activations {site}.{layer}", disable=not progress)
    batch: list[list[int]] = []

    def flush() -> None:
        nonlocal total
        ids = torch.tensor(batch, dtype=torch.long)
        acts = run_to_hook(model, ids, site, layer).float()
        keep = ~torch.isin(ids, special) if drop_special and len(special) else torch.ones_like(ids, dtype=torch.bool)
        rows = acts[keep]
        rows = rows[: max_tokens - total]
        kept.append(rows)
        total += rows.shape[0]
        bar.update(rows.shape[0])
        batch.clear()

    for window in token_windows(tokenizer, documents, context_length):
        batch.append(window.ids)
        if len(batch) == batch_windows:
            flush()
            if total >= max_tokens:
                break
    if batch and total < max_tokens:
        flush()
    bar.close()
    if total == 0:
        raise ValueError("the corpus produced no tokens (is it empty or shorter than one context window?)")
    return torch.cat(kept)
