"""What an activation function must provide: an inference code, a dense training reference,
and (for activations without a fixed per-token width) the training step's candidate selection.

Everything here works on pre-activations `pre = W_enc (x - b_pre) + b_enc` in the autoencoder's
normalised space; the model, the sparse training step and the dense reference call it, and it
knows nothing of them (no import of the model, the step or of torch.distributed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from saescale.core.config import SAEConfig

# gathers a 1-D tensor of equal length from every rank that shares the batch (TP and DP), as
# one concatenated 1-D tensor; identity on one process
Gather = Callable[[Tensor], Tensor]


class TopKCode(NamedTuple):
    """A sparse code: for each token, K latent indices and their (non-negative) values. Codes of
    activations without a fixed width are padded with zero values (they decode to nothing)."""

    values: Tensor  # [batch, K]
    indices: Tensor  # [batch, K] int64


def topk_code(pre: Tensor, k: int) -> TopKCode:
    """Each token's k largest pre-activations, through a ReLU (the TopK activation)."""
    values, indices = pre.topk(k, dim=1, sorted=False)
    return TopKCode(values.clamp_min(0), indices)


def masked_code(pre: Tensor, active: Tensor) -> TopKCode:
    """A padded code of the entries where `active` holds: width = the most active entries of any
    token (at least 1); a token with fewer gets zero values in the spare slots."""
    width = max(1, int(active.sum(1).max())) if active.numel() else 1
    values, indices = torch.where(active, pre, float("-inf")).topk(min(width, pre.shape[1]), dim=1, sorted=False)
    return TopKCode(torch.where(torch.isfinite(values), values, 0.0).clamp_min(0), indices)


def concat_codes(codes: list[TopKCode]) -> TopKCode:
    """Codes of consecutive row blocks as one; padded codes may differ in width, so each is padded
    with zero values to the widest."""
    width = max(c.values.shape[1] for c in codes)
    values, indices = [], []
    for c in codes:
        pad = width - c.values.shape[1]
        values.append(torch.nn.functional.pad(c.values, (0, pad)))
        indices.append(torch.nn.functional.pad(c.indices, (0, pad)))
    return TopKCode(torch.cat(values), torch.cat(indices))


class Candidates(NamedTuple):
    """Entries a chunk of the training batch offers to the selection: its rows (within the chunk)
    and local latent indices, in row-major order."""

    rows: Tensor
    latents: Tensor


class Activation:
    """One activation function. `fixed_width` ones (TopK) train through the step's [batch, k]
    path; the others offer candidates per chunk and keep a ragged subset of them."""

    name = "base"
    fixed_width = False
    # whether a low-precision pre-activation may pick the candidates (their values are always
    # recomputed in float32); False where the choice hinges on signs near zero (ReLU)
    low_precision_selection = True
    # whether the model's `threshold` buffer is learned state (saved, checkpointed, exported)
    has_threshold = False

    def check(self, cfg: SAEConfig) -> None:
        """Raise ConfigError for a config this activation cannot train (beyond SAEConfig's checks)."""

    def encode(self, pre: Tensor, cfg: SAEConfig, threshold: Tensor, k: int | None) -> TopKCode:
        """The inference code; an explicit `k` asks for test-time TopK on any activation."""
        if k is not None or self.fixed_width:
            return topk_code(pre, cfg.k if k is None else k)
        return self.inference_code(pre, cfg, threshold)

    def inference_code(self, pre: Tensor, cfg: SAEConfig, threshold: Tensor) -> TopKCode:
        """The activation's own code at inference (activations without a fixed width)."""
        raise NotImplementedError

    def reference_latents(self, pre: Tensor, cfg: SAEConfig) -> Tensor:
        """The dense [batch, n] training code, differentiable through autograd (the reference)."""
        raise NotImplementedError

    def reference_penalty(self, z: Tensor, cfg: SAEConfig) -> Tensor:
        """An extra loss on the dense code (ReLU's L1); 0 for the others."""
        return z.new_zeros(())

    # ---- training selection (activations without a fixed width) ---------------------------
    def budget(self, cfg: SAEConfig, global_rows: int) -> int | None:
        """How many entries the whole batch keeps (None: no fixed number)."""
        return None

    def candidates(self, pre: Tensor, count: int | None, cfg: SAEConfig) -> Candidates:
        """Entries of one chunk's pre-activation that may be kept; `count` is how many the
        selection may need from it (the budget, padded for a low-precision pre-activation)."""
        raise NotImplementedError

    def keep(self, values: Tensor, budget: int | None, gather: Gather) -> tuple[Tensor, Tensor | None]:
        """Which candidates (exact float32 values, all of this rank's) are kept, and the batch's
        threshold statistic (BatchTopK's smallest kept value, the same on every rank; else None)."""
        raise NotImplementedError

    def penalty_grad(self, cfg: SAEConfig, rows: int) -> float:
        """d(penalty)/d(value) of each kept entry (ReLU's l1_coef / rows); 0 for the others."""
        return 0.0
