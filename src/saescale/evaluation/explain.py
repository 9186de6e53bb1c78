"""Neuron-to-Graph (N2G) style explanations of latents, scored by precision and recall
(Gao et al. 2024, section 4.3; the algorithm of OpenAI's released `explanations.py`, re-derived).

For each top-activating example of a latent (a token sequence ending at the firing token):
1. the minimal suffix whose activation at its last token is still >= 1/2 of the original;
2. each token's saliency: replace it by a padding token, saliency = 1 - new / suffix activation;
   tokens with saliency < 1/2 become wildcards;
3. the pattern, read backwards from the firing token, goes into a trie whose leaf keeps the
   suffix's activation.
The explanation predicts, at every position, the largest leaf reached by walking backwards from
it (0 if none). Scored on held-out text with firing binarised at activation > 0 for both the
latent and the prediction: precision = P(fires | predicted), recall = P(predicted | fires).

The latent is only ever seen through `activation_fn(token_ids [b, seq]) -> [b, seq]`, so tests
plant a known function; `latent_activation_fn` builds the real one (language model to the hooked
site, then the SAE encoder).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from saescale.core.model import TopKSAE
from saescale.lm.hooks import run_to_hook

ActivationFn = Callable[[Tensor], Tensor]
WILDCARD = -1


class Explanation:
    """A trie of backward token patterns (WILDCARD matches any token) with leaf activations."""

    def __init__(self) -> None:
        self.root: dict = {}
        self.patterns: list[tuple[tuple[int, ...], float]] = []

    def add(self, backward: tuple[int, ...], activation: float) -> None:
        node = self.root
        for token in backward:
            node = node.setdefault(token, {})
        node["value"] = max(node.get("value", 0.0), activation)
        self.patterns.append((backward, activation))

    def _match(self, node: dict, tokens: list[int], pos: int) -> float:
        best = node.get("value", 0.0)
        if pos < 0:
            return best
        for key in (tokens[pos], WILDCARD):
            child = node.get(key)
            if child is not None:
                best = max(best, self._match(child, tokens, pos - 1))
        return best

    def predict(self, tokens: list[int]) -> list[float]:
        """The predicted activation at every position of one token sequence."""
        return [self._match(self.root, tokens, pos) for pos in range(len(tokens))]

    def describe(self, decode: Callable[[int], str] = str) -> list[str]:
        """Patterns in reading order, e.g. "* art| thou" (`|` separates tokens, `*` any token)."""
        best: dict[tuple[int, ...], float] = {}
        for backward, activation in self.patterns:  # one line per pattern, with its largest activation
            best[backward] = max(best.get(backward, 0.0), activation)
        out = []
        for backward, activation in sorted(best.items(), key=lambda p: -p[1]):
            words = ["*" if t == WILDCARD else decode(t) for t in reversed(backward)]
            out.append("|".join(words) + f"  ({activation:.3g})")
        return out


# (token_ids [b, seq], the latent of each row [b]) -> each row's latent's activation [b, seq]
RowActivationFn = Callable[[Tensor, Tensor], Tensor]


def _last_activations(fn: RowActivationFn, seqs: list[list[int]], latents: list[int], batch: int = 64) -> list[float]:
    """Each sequence's latent's activation at its last token. Sequences are batched only with
    others of the same length (no padding enters a forward pass that the sequence did not have)."""
    out = [0.0] * len(seqs)
    by_length: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        by_length.setdefault(len(s), []).append(i)
    for group in by_length.values():
        for start in range(0, len(group), batch):
            part = group[start : start + batch]
            acts = fn(torch.tensor([seqs[i] for i in part]), torch.tensor([latents[i] for i in part]))[:, -1]
            for i, a in zip(part, acts.tolist()):
                out[i] = a
    return out


@torch.no_grad()
def explain_examples(
    fn: RowActivationFn,
    jobs: list[tuple[int, list[int]]],
    pad: int,
    max_context: int = 12,
    keep: float = 0.5,
    wildcard_below: float = 0.5,
    originals: list[float] | None = None,
) -> list[tuple[tuple[int, ...], float] | None]:
    """`explain_example` for many (latent, tokens) jobs at once, in three batched phases (the
    activation in full context, then every minimal-suffix candidate, then every saliency probe),
    so that many latents share each language-model forward pass. `originals` gives the full-context
    activations when they are known already (e.g. from an activation cache)."""
    if originals is None:
        originals = _last_activations(fn, [t for _, t in jobs], [la for la, _ in jobs])
    live = [j for j, o in enumerate(originals) if o > 0]
    # phase 2: the suffixes of each example, left-padded to its own (truncated) length
    seqs, lats, owner = [], [], []
    for j in live:
        latent, tokens = jobs[j][0], jobs[j][1][-max_context:]
        for n in range(1, len(tokens) + 1):
            seqs.append([pad] * (len(tokens) - n) + tokens[-n:])
            lats.append(latent)
            owner.append(j)
    acts = _last_activations(fn, seqs, lats)
    suffix_acts: dict[int, list[float]] = {}
    for j, a in zip(owner, acts):
        suffix_acts.setdefault(j, []).append(a)
    chosen: dict[int, tuple[list[int], float]] = {}
    for j in live:
        tokens, per_length = jobs[j][1][-max_context:], suffix_acts[j]
        strong = [n for n, a in enumerate(per_length) if a >= keep * originals[j]]
        length = strong[0] + 1 if strong else len(tokens)
        if per_length[length - 1] > 0:
            chosen[j] = (tokens[-length:], per_length[length - 1])
    # phase 3: each token of each chosen suffix replaced by the padding token
    seqs, lats, owner = [], [], []
    for j, (suffix, _) in chosen.items():
        for i in range(len(suffix)):
            seqs.append(suffix[:i] + [pad] + suffix[i + 1 :])
            lats.append(jobs[j][0])
            owner.append(j)
    acts = _last_activations(fn, seqs, lats)
    replaced: dict[int, list[float]] = {}
    for j, a in zip(owner, acts):
        replaced.setdefault(j, []).append(a)
    out: list[tuple[tuple[int, ...], float] | None] = [None] * len(jobs)
    for j, (suffix, sub_act) in chosen.items():
        saliency = [1.0 - a / sub_act for a in replaced[j]]
        backward = [tok if s >= wildcard_below else WILDCARD for tok, s in zip(suffix, saliency)][::-1]
        while backward and backward[-1] == WILDCARD:  # wildcards at the far end constrain nothing
            backward.pop()
        if backward:
            out[j] = (tuple(backward), sub_act)
    return out


def _single(activation_fn: ActivationFn) -> RowActivationFn:
    return lambda token_ids, _latents: activation_fn(token_ids)


def explain_example(
    activation_fn: ActivationFn,
    tokens: list[int],
    pad: int,
    max_context: int = 12,
    keep: float = 0.5,
    wildcard_below: float = 0.5,
) -> tuple[tuple[int, ...], float] | None:
    """The backward pattern of one example (`tokens` ends at the firing token) and its suffix
    activation; None if the latent does not fire on it or every token is a wildcard."""
    return explain_examples(_single(activation_fn), [(0, tokens)], pad, max_context, keep, wildcard_below)[0]


def build_explanation(
    activation_fn: ActivationFn, examples: list[list[int]], pad: int, max_context: int = 12
) -> Explanation:
    return build_explanations(_single(activation_fn), {0: examples}, pad, max_context)[0]


def build_explanations(
    fn: RowActivationFn,
    examples: dict[int, list[list[int]]],
    pad: int,
    max_context: int = 12,
    originals: dict[int, list[float]] | None = None,
) -> dict[int, Explanation]:
    """latent -> its explanation from its examples, all latents batched together."""
    jobs = [(latent, tokens) for latent, texts in examples.items() for tokens in texts]
    known = [a for latent, texts in examples.items() for a in originals[latent][: len(texts)]] if originals else None
    found = explain_examples(fn, jobs, pad, max_context, originals=known)
    out = {latent: Explanation() for latent in examples}
    for (latent, _), pattern in zip(jobs, found):
        if pattern is not None:
            out[latent].add(*pattern)
    return out


@dataclass
class ExplanationScore:
    latent: int
    patterns: list[str]
    precision: float  # NaN if the explanation never predicts firing
    recall: float  # NaN if the latent never fires on the test text
    f1: float
    test_firings: int

    def to_dict(self) -> dict:
        return asdict(self)


def score_explanation(
    explanation: Explanation, windows: Tensor, activations: Tensor
) -> tuple[float, float, float, int]:
    """Precision, recall, F1 of the explanation's firing against `activations` [n, seq] (> 0)."""
    predicted = torch.tensor([explanation.predict(w) for w in windows.tolist()]) > 0
    real = activations > 0
    tp = int((predicted & real).sum())
    n_pred, n_real = int(predicted.sum()), int(real.sum())
    precision = tp / n_pred if n_pred else float("nan")
    recall = tp / n_real if n_real else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f1, n_real


def latent_codes(
    model: nn.Module, sae: TopKSAE, windows: Tensor, site: str, layer: int, batch_size: int = 16
) -> tuple[Tensor, Tensor]:
    """The SAE's TopK code (values, indices), each [n, seq, k], of every position of `windows`."""
    values, indices = [], []
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch_size):
            h = run_to_hook(model, windows[start : start + batch_size], site, layer).float()
            code = sae.encode(h.reshape(-1, h.shape[-1]))
            values.append(code.values.reshape(*h.shape[:2], -1))
            indices.append(code.indices.reshape(*h.shape[:2], -1))
    return torch.cat(values), torch.cat(indices)


def latent_activation(values: Tensor, indices: Tensor, latent: int) -> Tensor:
    """One latent's activation [..., seq] from TopK codes (0 where it is not among the top k)."""
    return (values * (indices == latent)).sum(-1).clamp_min(0)


def codes_activation_fn(model: nn.Module, sae: TopKSAE, site: str, layer: int) -> RowActivationFn:
    """The real activation function for many latents: one forward of the language model to the
    hooked site and the encoder, then each row's own latent."""

    def fn(token_ids: Tensor, latents: Tensor) -> Tensor:
        values, indices = latent_codes(model, sae, token_ids, site, layer, batch_size=64)
        return (values * (indices == latents[:, None, None])).sum(-1).clamp_min(0)

    return fn


def latent_activation_fn(model: nn.Module, sae: TopKSAE, site: str, layer: int, latent: int) -> ActivationFn:
    """The real activation function: the language model to the hooked site, then the encoder."""

    def fn(token_ids: Tensor) -> Tensor:
        values, indices = latent_codes(model, sae, token_ids, site, layer, batch_size=64)
        return latent_activation(values, indices, latent)

    return fn


def explain_latents(
    model: nn.Module,
    sae: TopKSAE,
    windows: Tensor,
    site: str,
    layer: int,
    pad: int,
    n_latents: int = 16,
    examples: int = 5,
    max_context: int = 12,
    seed: int = 0,
    decode: Callable[[int], str] = str,
) -> dict:
    """Explain `n_latents` sampled latents from the top examples in the first half of `windows`
    and score them on the second half. Latents are sampled among those firing in both halves."""
    if windows.shape[0] < 2:
        raise ValueError(f"explanations need at least 2 held-out windows (got {windows.shape[0]})")
    values, indices = latent_codes(model, sae, windows, site, layer)
    half = windows.shape[0] // 2
    active = values > 0
    fired_train = torch.zeros(sae.cfg.n_latents, dtype=torch.bool)
    fired_test = torch.zeros(sae.cfg.n_latents, dtype=torch.bool)
    fired_train[indices[:half][active[:half]]] = True
    fired_test[indices[half:][active[half:]]] = True
    candidates = (fired_train & fired_test).nonzero().flatten()
    if candidates.numel() == 0:
        raise ValueError("no latent fires in both halves of the held-out windows: use more windows")
    generator = torch.Generator().manual_seed(seed)
    chosen = candidates[torch.randperm(candidates.numel(), generator=generator)[:n_latents]].sort().values.tolist()
    seq = windows.shape[1]
    texts: dict[int, list[list[int]]] = {}
    for latent in chosen:
        acts = latent_activation(values, indices, latent)
        top = acts[:half].flatten().topk(min(examples, int((acts[:half] > 0).sum()))).indices.tolist()
        texts[latent] = [windows[i // seq, : i % seq + 1].tolist() for i in top]
    explanations = build_explanations(codes_activation_fn(model, sae, site, layer), texts, pad, max_context)
    scores = []
    for latent in chosen:
        acts = latent_activation(values, indices, latent)
        explanation = explanations[latent]
        precision, recall, f1, firings = score_explanation(explanation, windows[half:], acts[half:])
        scores.append(ExplanationScore(latent, explanation.describe(decode), precision, recall, f1, firings))

    def mean(key: str) -> float:
        vals = [getattr(s, key) for s in scores if getattr(s, key) == getattr(s, key)]  # drop NaN
        return sum(vals) / len(vals) if vals else float("nan")

    return {
        "latents": [s.to_dict() for s in scores],
        "mean_precision": mean("precision"),
        "mean_recall": mean("recall"),
        "mean_f1": mean("f1"),
        "train_windows": half,
        "test_windows": windows.shape[0] - half,
        "examples_per_latent": examples,
        "max_context": max_context,
    }
