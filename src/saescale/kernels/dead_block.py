"""AuxK products over the block of dead latents, as dense matmuls.

AuxK picks k_aux (~d/2, e.g. 256) of the dead latents per token. When the dead block is small
(a few thousand latents, the normal state of a healthy run), one dense [batch, n_dead] matmul is
much cheaper than gathering k_aux rows per token: a GEMM runs at ~16x the per-FLOP rate of a
gather on CPU, and far more on GPU. `use_dense_block` makes that choice; the sparse path (the
same kernels as the main TopK) is used when many latents are dead.

bfloat16 (or, in fp16 training, float16 under the loss scale) matmuls are optional: the AuxK
gradient only steers dead latents back to life, as in the paper's own fp16 training.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

# Dense block if n_dead <= this many times k_aux (measured crossover on CPU is ~16x).
DENSE_BLOCK_MAX_RATIO = 16
# Inside the dense regime, gather the active entries instead when under 1/64 of the block is
# active (measured: at 2.3% active, 38 entries/token at n_dead=1632, the dense bf16 block wins).
RAGGED_MAX_DENSITY_INV = 64


def use_dense_block(n_dead: int, k_aux: int) -> bool:
    return n_dead <= DENSE_BLOCK_MAX_RATIO * k_aux


def dead_block_capacity(n_latents: int, k_aux: int) -> int:
    """The most columns of the fixed-shape dead block (the sync-free step): the dense regime's bound."""
    return min(n_latents, DENSE_BLOCK_MAX_RATIO * max(1, k_aux))


def dead_block_width(seen: int | None, n_latents: int, k_aux: int) -> int:
    """Columns of the sync-free step's dead block, from the dead count of an earlier step
    (`seen`, None before any): twice that, rounded up to a power of two (few distinct shapes,
    room for latents that die in between), at least k_aux and at most `dead_block_capacity`.
    A healthy run (no dead latent) pays for a [batch, k_aux] block, not a 16x wider one."""
    cap = dead_block_capacity(n_latents, k_aux)
    if seen is None:
        return cap
    return min(cap, max(1, k_aux, 1 << max(0, 2 * seen - 1).bit_length()))


def dead_slots(dead: Tensor, capacity: int) -> tuple[Tensor, Tensor, Tensor]:
    """The first `capacity` dead latents in index order as fixed-shape device tensors, with no
    host synchronisation: (their indices, padded with 0; which slots hold one; the dead count).

    `nonzero()` would give the same indices but makes the host wait for the device to learn
    how many there are; here each dead latent's slot is its rank among the dead (a cumsum) and
    the rest are scattered into one spare slot that is dropped."""
    n = dead.numel()
    rank = torch.cumsum(dead, 0) - 1
    slot = torch.where(dead & (rank < capacity), rank, capacity)
    latents = torch.zeros(capacity + 1, dtype=torch.long, device=dead.device)
    latents.scatter_(0, slot, torch.arange(n, device=dead.device))
    count = rank[-1] + 1 if n else torch.zeros((), dtype=torch.long, device=dead.device)
    valid = torch.arange(capacity, device=dead.device) < count
    return latents[:capacity].masked_fill_(~valid, 0), valid, count


@functools.cache
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
    latents rarely have many positive pre-activations). Otherwise a top-k selects them. The
    ReLU/selection mask is recovered in the backward as Z > 0 (a selected entry with value 0 has
    zero gradient through the ReLU anyway). In float32 the block is read from the step's own
    pre-activation buffer when it holds the whole batch in float32 (bit-exact with the dense
    reference); otherwise (low precision, or a micro-batched step, `pre=None`) it is recomputed
    by a [batch, d] x [d, n_dead] matmul in `dtype`.

    With `valid` (the sync-free step's fixed-shape block from `dead_slots`), columns whose slot
    is empty are inactive, and the shortcut's test (which reads a count on the host) is skipped:
    the top-k always runs when the block is wider than k_aux (it gives the same Z).
    """

    def __init__(
        self,
        pre: Tensor | None,
        x_centred: Tensor,
        w_enc: Tensor,
        b_enc: Tensor,
        dead_idx: Tensor,
        k_aux: int,
        dtype: torch.dtype,
        valid: Tensor | None = None,
    ) -> None:
        batch, n_dead = x_centred.shape[0], int(dead_idx.numel())
        self.dtype = dtype
        # (no out= buffers here: mkldnn's matmul into a view computes aside and copies, 3x slower)
        if pre is not None and pre.dtype == dtype == torch.float32:
            # exact: the dead columns of the step's own pre-activation buffer
            self.code = pre.index_select(1, dead_idx)
        else:
            # low precision: recompute the dead block with one small matmul in `dtype`, cheaper
            # than gathering scattered columns of the [batch, n] buffer and converting them; the
            # bias rides along as an extra input column (no broadcast copy into the output)
            ones = torch.ones(batch, 1, dtype=dtype, device=x_centred.device)
            x_aug = torch.cat([x_centred.to(dtype), ones], dim=1)
            w_aug = torch.cat([w_enc[dead_idx], b_enc[dead_idx, None]], dim=1).to(dtype)
            self.code = x_aug @ w_aug.t()
        if valid is not None:
            self.code.masked_fill_(~valid, 0)
        self.inactive = self.code <= 0  # ReLU mask, reused by the backward
        # active entries per token (int32 per row: summing a bool tensor into int64 is 6x slower)
        self.active_per_row = n_dead - self.inactive.sum(1, dtype=torch.int32)
        if valid is not None:  # fixed shapes: no host read of the active counts
            self.used_topk = k_aux < n_dead
        else:
            self.used_topk = k_aux < n_dead and int(self.active_per_row.max()) > k_aux
        if not self.used_topk:
            self.code.masked_fill_(self.inactive, 0)
        else:
            vals, local = self.code.topk(k_aux, dim=1, sorted=False)
            self.code.zero_().scatter_(1, local, vals.clamp_min(0))
            self.inactive = self.code <= 0

    def sparse_enough(self) -> bool:
        """True when so few entries are active that gathering them beats the dense matmuls."""
        if self.used_topk:
            return False
        active = int(self.active_per_row.sum(dtype=torch.int64))
        return active * RAGGED_MAX_DENSITY_INV <= self.inactive.numel()

    def ragged(self, dead_idx: Tensor):
        """The active entries as a RaggedCode over global latent indices (row-major order)."""
        from saescale.kernels.sparse import RaggedCode

        rows, cols = (~self.inactive).nonzero(as_tuple=True)
        values = self.code[rows, cols].float()
        return RaggedCode(rows, dead_idx[cols], values, self.code.shape[0])

    def decode(self, w_dec_dead: Tensor) -> Tensor:
        return (self.code @ w_dec_dead.to(self.dtype)).float()

    def backward(self, grad_out: Tensor, w_dec_dead: Tensor, x_centred: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns the gradients for (W_dec[dead], W_enc[dead], b_enc[dead]), in float32."""
        dtype = self.dtype
        g_out = grad_out.to(dtype)
        batch = self.code.shape[0]
        grad_pre = (g_out @ w_dec_dead.to(dtype).t()).masked_fill_(self.inactive, 0)
        grad_w_dec = (self.code.t() @ g_out).float()
        grad_w_enc = (grad_pre.t() @ x_centred.to(dtype)).float()
        ones = torch.ones(1, batch, dtype=dtype, device=grad_pre.device)
        grad_b_enc = (ones @ grad_pre).float().view(-1)
        return grad_w_dec, grad_w_enc, grad_b_enc
