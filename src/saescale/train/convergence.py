"""Tokens to convergence of a training curve: where the loss flattens (the paper's T(N))."""

from __future__ import annotations

import numpy as np


def tokens_to_convergence(tokens, loss, tol: float = 0.05, window: int = 5) -> float:
    """Tokens after which the training loss stays within `tol` (relative) of its final value:
    the first point from which every later point of the trailing `window`-point moving average
    is at most (1 + tol) x the final average. With a fixed token budget this is where the curve
    flattens; it is an upper bound on convergence only if the run had converged."""
    tokens, loss = np.asarray(tokens, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    if tokens.size == 0 or tokens.size != loss.size:
        raise ValueError(f"need matching, non-empty token and loss curves (got {tokens.size} and {loss.size} points)")
    kernel = np.ones(min(window, loss.size))
    smooth = (
        np.convolve(loss, kernel, "full")[: loss.size] / np.convolve(np.ones_like(loss), kernel, "full")[: loss.size]
    )
    above = np.nonzero(smooth > smooth[-1] * (1.0 + tol))[0]
    first = int(above[-1]) + 1 if above.size else 0
    return float(tokens[min(first, tokens.size - 1)])
