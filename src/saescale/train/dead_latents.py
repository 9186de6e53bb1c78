"""Dead-latent bookkeeping: tokens since each latent last fired (Gao et al. 2024, A.2)."""

from __future__ import annotations

import torch
from torch import Tensor


class DeadLatentTracker:
    """A latent is dead once it has not fired for `threshold_tokens` tokens (paper: 10M).

    Counters are int64 per latent; under tensor parallelism each rank holds its own slice.
    """

    def __init__(self, n_latents: int, threshold_tokens: int, device: torch.device | str | None = None) -> None:
        self.threshold_tokens = int(threshold_tokens)
        self.tokens_since_fired = torch.zeros(n_latents, dtype=torch.long, device=device)

    def update(self, fired_indices: Tensor, n_tokens: int) -> None:
        """Advance every counter by this batch's tokens, then reset the ones that fired."""
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired_indices.reshape(-1)] = 0

    def update_mask(self, fired: Tensor, n_tokens: int) -> None:
        """`update` from a [n_latents] boolean mask of the latents that fired (no indexing by a
        mask, which would make a GPU's host wait for its size)."""
        self.tokens_since_fired.add_(n_tokens).masked_fill_(fired, 0)

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.threshold_tokens

    def dead_fraction(self) -> float:
        return self.dead_mask().float().mean().item()

    def state_dict(self) -> dict[str, Tensor]:
        return {"tokens_since_fired": self.tokens_since_fired.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        counters = state["tokens_since_fired"]
        if counters.shape != self.tokens_since_fired.shape:
            raise ValueError(
                f"dead-latent counters have shape {tuple(counters.shape)}, expected {tuple(self.tokens_since_fired.shape)}"
            )
        self.tokens_since_fired.copy_(counters)
