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


def _left_pad(sequences: list[list[int]], pad: int) -> Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([[pad] * (width - len(s)) + s for s in sequences], dtype=torch.long)


@torch.no_grad()
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
    original = float(activation_fn(torch.tensor([tokens]))[0, -1])  # in its full context
    if original <= 0:
        return None
    tokens = tokens[-max_context:]  # a latent that needs more context than this gets no pattern
    suffixes = [tokens[-n:] for n in range(1, len(tokens) + 1)]
    acts = activation_fn(_left_pad(suffixes, pad))[:, -1]
    strong = (acts >= keep * original).nonzero()
    length = int(strong[0]) + 1 if strong.numel() else len(tokens)
    suffix, sub_act = tokens[-length:], float(acts[length - 1])
    if sub_act <= 0:
        return None
    replaced = [suffix[:i] + [pad] + suffix[i + 1 :] for i in range(length)]
    new_acts = activation_fn(torch.tensor(replaced))[:, -1]
    saliency = 1.0 - new_acts / sub_act
    backward = [tok if float(s) >= wildcard_below else WILDCARD for tok, s in zip(suffix, saliency)][::-1]
    while backward and backward[-1] == WILDCARD:  # wildcards at the far end constrain nothing
        backward.pop()
    return (tuple(backward), sub_act) if backward else None


def build_explanation(
    activation_fn: ActivationFn, examples: list[list[int]], pad: int, max_context: int = 12
) -> Explanation:
    explanation = Explanation()
    for tokens in examples:
        found = explain_example(activation_fn, tokens, pad, max_context)
        if found is not None:
            explanation.add(*found)
    return explanation


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
    progress: bool = True,
) -> dict:
    """Explain `n_latents` sampled latents from the top examples in the first half of `windows`
    and score them on the second half. Latents are sampled among those firing in both halves."""
    from tqdm import tqdm

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
    scores = []
    for latent in tqdm(chosen, desc="N2G explanations", unit="latent", disable=not progress):
        acts = latent_activation(values, indices, latent)
        top = acts[:half].flatten().topk(min(examples, int((acts[:half] > 0).sum()))).indices.tolist()
        seq = windows.shape[1]
        texts = [windows[i // seq, : i % seq + 1].tolist() for i in top]
        explanation = build_explanation(latent_activation_fn(model, sae, site, layer, latent), texts, pad, max_context)
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
