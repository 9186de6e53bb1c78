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
    cpu_mod = getattr(torch._C, "_cpu", None)
    for name in probes:
        fn = getattr(cpu_mod, name, None)
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


def _mm(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    if dtype == torch.float32:
        return a @ b
    return (a.to(dtype) @ b.to(dtype)).float()


class DeadBlock:
    """Forward and backward of the AuxK reconstruction e_hat = Z @ W_dec[dead] on the dead block."""

    def __init__(self, pre_dead: Tensor, k_aux: int, dtype: torch.dtype) -> None:
        # pre_dead: [batch, n_dead] encoder pre-activations of the dead latents
        vals, local = pre_dead.topk(k_aux, dim=1, sorted=False)
        self.local = local
        self.vals = vals.clamp_min(0)
        self.code = torch.zeros_like(pre_dead).scatter_(1, local, self.vals)
        self.dtype = dtype

    def decode(self, w_dec_dead: Tensor) -> Tensor:
        return _mm(self.code, w_dec_dead, self.dtype)

    def backward(
        self, grad_out: Tensor, w_dec_dead: Tensor, x_centred: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Returns the gradients for (W_dec[dead], W_enc[dead], b_enc[dead])."""
        grad_code = _mm(grad_out, w_dec_dead.t(), self.dtype)
        picked = grad_code.gather(1, self.local) * (self.vals > 0)
        grad_pre = torch.zeros_like(grad_code).scatter_(1, self.local, picked)
        grad_w_dec = _mm(self.code.t(), grad_out, self.dtype)
        grad_w_enc = _mm(grad_pre.t(), x_centred, self.dtype)
        grad_b_enc = grad_pre.sum(0)
        return grad_w_dec, grad_w_enc, grad_b_enc
