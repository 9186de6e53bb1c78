"""TopK (Gao et al. 2024): each token keeps its k largest pre-activations, through a ReLU.

Training uses the sparse step's fixed-width path (`saescale.train.step`), including Multi-TopK
and the exact global top-k under tensor parallelism.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saescale.core.arch.base import Activation
from saescale.core.config import SAEConfig


class TopK(Activation):
    name = "topk"
    fixed_width = True

    def reference_latents(self, pre: Tensor, cfg: SAEConfig, k: int | None = None) -> Tensor:
        vals, idx = pre.topk(cfg.k if k is None else k, dim=1)
        return torch.zeros_like(pre).scatter(1, idx, vals.relu())


ACTIVATION = TopK()
