"""ReLU with an L1 penalty: the paper's baseline (Gao et al. 2024, section 2.2).

z = ReLU(W_enc (x - b_pre) + b_enc), loss = the main MSE + l1_coef * mean over tokens of
sum_i z_i ||W_dec,i||. The decoder rows are kept at unit norm, as for TopK (the same step and
optimiser: the gradient's radial part is removed and the rows renormalised), so the penalty is the
plain L1 of the code. The constraint is what makes an L1 penalty mean anything: without it the
penalty is dodged by shrinking z and growing the decoder (the `activations x decoder norms` form
of Anthropic's later recipe is the same penalty at unit norm). Same init (encoder = decoder
transpose, b_pre at the geometric median) and lr rule as TopK; the paper gives no separate ones.

Training takes every positive entry, from a float32 encoder GEMM whatever `train.precision` says (a ragged code; early in training that is about half of
them, so a ReLU step costs more than a TopK one). Under tensor parallelism each rank keeps its own
positives: no selection needs communicating.
"""

from __future__ import annotations

from torch import Tensor

from saescale.core.arch.base import Activation, Candidates, Gather, TopKCode, masked_code
from saescale.core.config import ConfigError, SAEConfig


class ReLU(Activation):
    name = "relu"
    # every positive entry is kept, so a bf16 GEMM's rounding would drop entries just above 0
    # (measured: 1.7% error in W_enc's gradient at d=24); ReLU's encoder GEMM runs in float32
    low_precision_selection = False

    def inference_code(self, pre: Tensor, cfg: SAEConfig, threshold: Tensor) -> TopKCode:
        return masked_code(pre, pre > 0)

    def check(self, cfg: SAEConfig) -> None:
        if cfg.l1_coef <= 0:  # an imported ReLU SAE may carry none: it is only evaluated
            raise ConfigError("training sae.architecture=relu needs sae.l1_coef > 0, its only sparsity pressure")

    def reference_latents(self, pre: Tensor, cfg: SAEConfig) -> Tensor:
        return pre.relu()

    def reference_penalty(self, z: Tensor, cfg: SAEConfig) -> Tensor:
        return cfg.l1_coef * z.sum(1).mean()

    def candidates(self, pre: Tensor, count: int | None, cfg: SAEConfig) -> Candidates:
        rows, latents = (pre > 0).nonzero(as_tuple=True)
        return Candidates(rows, latents)

    def keep(self, values: Tensor, budget: int | None, gather: Gather) -> tuple[Tensor, Tensor | None]:
        return values > 0, None

    def penalty_grad(self, cfg: SAEConfig, rows: int) -> float:
        return cfg.l1_coef / rows


ACTIVATION = ReLU()
