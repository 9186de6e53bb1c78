"""AuxK products over the block of dead latents, as dense matmuls.

AuxK picks k_aux (~d/2, e.g. 256) of the dead latents per token. When the dead block is small
(a few thousand latents, the normal state of a healthy run), one dense [batch, n_dead] matmul is
much cheaper than gathering k_aux rows per token: a GEMM runs at ~16x the per-FLOP rate of a
gather on CPU, and far more on GPU. `use_dense_block` makes that choice; the sparse path (the
same kernels as the main TopK) is used when many latents are dead.

bfloat16 matmuls are optional (the AuxK gradient only steers dead latents back to life, as in
the paper's own fp16 training); the main TopK path is always float32.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

# Dense block if n_dead <= this many times k_aux (measured crossover on CPU is ~16x).
DENSE_BLOCK_MAX_RATIO = 16


def use_dense_block(n_dead: int, k_aux: int) -> bool:
    return n_dead <= DENSE_BLOCK_MAX_RATIO * k_aux


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """True when this CPU multiplies bfloat16 natively (AMX or AVX512-BF16)."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    for name in probes:
        fn = getattr(torch.cpu, name, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # pragma: no cover - probe not available on this build
            continue
    return False


def resolve_aux_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "float32":
        return torch.float32
    if precision == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


class DeadBlock:
    """Forward and backward of the AuxK reconstruction e_hat = Z @ W_dec[dead] on the dead block.

    Z [batch, n_dead] holds each token's top-k_aux dead-latent activations after ReLU (zeros
    elsewhere), built directly in the matmul dtype. Shortcut, exact: when no token has more than
    k_aux positive dead pre-activations, the top-k_aux set contains every positive entry and the
    rest are zeroed by the ReLU, so Z = ReLU(pre) with no top-k at all (the usual case: dead
    latents rarely have many positive pre-activations). Otherwise a top-k selects them.
    """

    def __init__(self, pre_dead: Tensor, k_aux: int, dtype: torch.dtype) -> None:
        # pre_dead: [batch, n_dead] encoder pre-activations of the dead latents
        self.dtype = dtype
        positive = pre_dead > 0
        if k_aux >= pre_dead.shape[1] or int(positive.sum(1).max()) <= k_aux:
            self.used_topk = False
            self.mask = positive.to(dtype)
            self.code = pre_dead.to(dtype).clamp_min_(0)
        else:
            self.used_topk = True
            vals, local = pre_dead.topk(k_aux, dim=1, sorted=False)
            self.mask = torch.zeros(pre_dead.shape, dtype=dtype, device=pre_dead.device)
            self.mask.scatter_(1, local, (vals > 0).to(dtype))
            self.code = torch.zeros(pre_dead.shape, dtype=dtype, device=pre_dead.device)
            self.code.scatter_(1, local, vals.clamp_min(0).to(dtype))

    def decode(self, w_dec_dead: Tensor) -> Tensor:
        return (self.code @ w_dec_dead.to(self.dtype)).float()

    def backward(
        self, grad_out: Tensor, w_dec_dead: Tensor, x_centred: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Returns the gradients for (W_dec[dead], W_enc[dead], b_enc[dead]), in float32."""
        dtype = self.dtype
        g_out = grad_out.to(dtype)
        grad_pre = (g_out @ w_dec_dead.to(dtype).t()).mul_(self.mask)
        grad_w_dec = (self.code.t() @ g_out).float()
        grad_w_enc = (grad_pre.t() @ x_centred.to(dtype)).float()
        ones = torch.ones(1, grad_pre.shape[0], dtype=dtype, device=grad_pre.device)
        grad_b_enc = (ones @ grad_pre).float().view(-1)
        return grad_w_dec, grad_w_enc, grad_b_enc
