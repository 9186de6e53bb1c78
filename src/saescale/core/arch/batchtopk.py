"""BatchTopK (Bussmann, Leask and Nanda 2024): the batch keeps its k * batch largest
pre-activations, wherever they fall, so L0 is k on average but varies per token.

Training: each chunk of the batch offers its own top k * batch entries (the batch's top k * batch
lie in the union of the chunks'); under tensor and data parallelism every rank offers its
top k * batch exact values, one all-gather of them gives the global k * batch-th value, and
each rank keeps its entries at or above it (and > 0): exactly the single-process selection.

Inference: a JumpReLU at one global threshold, z = pre * (pre > threshold), estimated during
training as a running mean of each batch's smallest kept value (the trainer updates the model's
`threshold` buffer; it is saved with the weights and exported to SAELens as JumpReLU).
"""

from __future__ import annotations

import torch
from torch import Tensor

from saescale.core.arch.base import Activation, Candidates, Gather, TopKCode, masked_code
from saescale.core.config import SAEConfig

# each token offers its top PER_TOKEN_FACTOR * k entries first (see BatchTopK.candidates)
PER_TOKEN_FACTOR = 4
# the batch threshold is averaged over about this many recent batches (SAELens: an EMA at 0.01)
THRESHOLD_WINDOW = 100


def threshold_weight(step: int) -> float:
    """Weight of step `step`'s (0-based) batch threshold: a plain mean over the first
    THRESHOLD_WINDOW steps, then an exponential average over about that many."""
    return 1.0 / min(step + 1, THRESHOLD_WINDOW)


class BatchTopK(Activation):
    name = "batchtopk"
    has_threshold = True

    def inference_code(self, pre: Tensor, cfg: SAEConfig, threshold: Tensor) -> TopKCode:
        return masked_code(pre, pre > threshold.clamp_min(0))

    def reference_latents(self, pre: Tensor, cfg: SAEConfig) -> Tensor:
        z = pre.relu()
        flat = z.reshape(-1)
        vals, pos = flat.topk(min(cfg.k * pre.shape[0], flat.numel()))
        return torch.zeros_like(flat).scatter(0, pos, vals).reshape(pre.shape)

    def budget(self, cfg: SAEConfig, global_rows: int) -> int:
        return cfg.k * global_rows

    def candidates(self, pre: Tensor, count: int | None, cfg: SAEConfig) -> Candidates:
        """Every entry of the chunk that can be among the batch's top `count`, without a top-k
        over the whole flattened chunk (3x slower than TopK's per-token top-k on CPU): each
        token's top PER_TOKEN_FACTOR * k, plus, for a token whose last such entry is not below
        the chunk's own count-th candidate value (a lower bound of the batch's cut), all of its
        entries at or above that bound."""
        assert count is not None
        rows, n = pre.shape
        per_token = min(n, PER_TOKEN_FACTOR * cfg.k)
        if rows * per_token <= count or per_token == n:  # too few per-token candidates to bound the cut
            flat = pre.reshape(-1)
            pos = flat.topk(min(count, flat.numel()), sorted=False).indices
        else:
            vals, idx = pre.topk(per_token, dim=1, sorted=False)
            bound = vals.reshape(-1).topk(count, sorted=False).values.min()
            full = vals.min(dim=1).values >= bound  # tokens that may hold more entries above it
            keep = ~full[:, None].expand_as(idx)
            pos = (torch.arange(rows, device=pre.device)[:, None] * n + idx)[keep]
            if bool(full.any()):
                r, c = (pre[full] >= bound).nonzero(as_tuple=True)
                pos = torch.cat([pos, full.nonzero().flatten()[r] * n + c])
        pos = pos.sort().values  # row-major
        return Candidates(torch.div(pos, n, rounding_mode="floor"), pos % n)

    def keep(self, values: Tensor, budget: int | None, gather: Gather) -> tuple[Tensor, Tensor | None]:
        assert budget is not None
        offer = torch.full((budget,), float("-inf"), device=values.device)
        mine = values.topk(min(budget, values.numel()), sorted=False).values
        offer[: mine.numel()] = mine
        chosen = gather(offer).topk(budget, sorted=False).values
        positive = chosen[chosen > 0]
        if positive.numel() == 0:  # nothing fires in the whole batch
            return torch.zeros_like(values, dtype=torch.bool), None
        cut = positive.min()
        return values >= cut, cut


ACTIVATION = BatchTopK()
