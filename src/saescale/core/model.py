"""The sparse autoencoder of Gao et al. (2024): parameters, normalisation, inference. TopK by
default; `cfg.architecture` picks the activation (`saescale.core.arch`: TopK, BatchTopK, ReLU).

Storage layout (chosen so that tensor parallelism slices contiguous rows of every
latent-indexed tensor): W_enc [n, d], b_enc [n], W_dec [n, d] (row i = decoder direction of
latent i, unit norm), b_pre [d]. Training runs through `saescale.train.step` (sparse custom backward);
this module is what users load for inference and what exports are made from.

The model knows nothing of language models, Ray or storage.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from saescale.core.arch import TopKCode, activation
from saescale.core.config import SAEConfig
from saescale.kernels.sparse import sparse_decode

__all__ = ["InputShapeError", "NonFiniteInputError", "TopKCode", "TopKSAE", "check_activations"]


class InputShapeError(ValueError):
    """Activations have the wrong shape for this autoencoder."""


class NonFiniteInputError(ValueError):
    """Activations contain NaN or inf values."""


def check_activations(x: Tensor, d_in: int, name: str = "activations") -> None:
    """Fail loudly on the two bad inputs that otherwise poison a run silently."""
    if x.dim() != 2 or x.shape[1] != d_in:
        raise InputShapeError(f"{name} must have shape [batch, d_in={d_in}], got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).any(dim=1).nonzero().flatten()[:5].tolist()
        raise NonFiniteInputError(f"{name} contain NaN or inf values (first bad rows: {bad})")


def geometric_median(points: Tensor, max_iter: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances (b_pre init)."""
    points = points.double()
    median = points.mean(0)
    for _ in range(max_iter):
        dist = (points - median).norm(dim=1).clamp_min(1e-12)
        weights = 1.0 / dist
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - median).norm() <= tol * max(1.0, median.norm().item()):
            median = new
            break
        median = new
    return median.float()


INIT_BLOCK_ROWS = 4096  # rows drawn per seeded generator (see reset_parameters_seeded)


class TopKSAE(nn.Module):
    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        n, d = cfg.n_latents, cfg.d_in
        factory = {"device": device, "dtype": torch.float32}
        self.W_enc = nn.Parameter(torch.empty(n, d, **factory))
        self.b_enc = nn.Parameter(torch.zeros(n, **factory))
        self.W_dec = nn.Parameter(torch.empty(n, d, **factory))
        self.b_pre = nn.Parameter(torch.zeros(d, **factory))
        # dataset_scale normalisation factor (1.0 until fitted from data)
        self.register_buffer("input_scale", torch.ones((), **factory))
        # BatchTopK's inference threshold (a JumpReLU at one value), estimated during training;
        # saved only for that architecture
        self.register_buffer("threshold", torch.zeros((), **factory))
        self.activation = activation(cfg.architecture)
        self.reset_parameters()

    # ----------------------------------------------------------------- init
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None, transpose_init: bool = True) -> None:
        """Decoder rows uniform on the sphere; encoder = decoder transpose (then untied)."""
        d = self.cfg.d_in
        bound = 1.0 / math.sqrt(d)
        self.W_dec.uniform_(-bound, bound, generator=generator)
        self.normalize_decoder_()
        if transpose_init:
            self.W_enc.copy_(self.W_dec)
        else:
            self.W_enc.uniform_(-bound, bound, generator=generator)
        self.b_enc.zero_()
        self.b_pre.zero_()

    @torch.no_grad()
    def reset_parameters_seeded(self, seed: int, row_offset: int = 0, transpose_init: bool = True) -> None:
        """The same init, drawn in fixed blocks of INIT_BLOCK_ROWS global rows, each from its own
        seeded generator: latent i gets the same initial row whether this module holds the whole
        autoencoder or a tensor-parallel slice starting at `row_offset` (no rank ever draws more
        than one block beyond its slice, so a 16M-latent init needs no full-size temporary)."""
        n, d = self.cfg.n_latents, self.cfg.d_in
        bound = 1.0 / math.sqrt(d)
        first, last = row_offset // INIT_BLOCK_ROWS, (row_offset + n - 1) // INIT_BLOCK_ROWS
        for block in range(first, last + 1):
            lo = max(block * INIT_BLOCK_ROWS, row_offset)
            hi = min((block + 1) * INIT_BLOCK_ROWS, row_offset + n)
            skip = lo - block * INIT_BLOCK_ROWS
            for target, stream in ((self.W_dec, 0), (self.W_enc, 1)):
                if stream == 1 and transpose_init:
                    continue
                g = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + block) * 2 + stream)
                rows = torch.empty(skip + hi - lo, d).uniform_(-bound, bound, generator=g)[skip:]
                target[lo - row_offset : hi - row_offset].copy_(rows)
        self.normalize_decoder_()
        if transpose_init:
            self.W_enc.copy_(self.W_dec)
        self.b_enc.zero_()
        self.b_pre.zero_()

    @torch.no_grad()
    def init_from_data_(self, sample: Tensor, max_median_points: int = 32768) -> None:
        """Fit the input normalisation and set b_pre to the geometric median of a data sample."""
        check_activations(sample, self.cfg.d_in, "initialisation sample")
        sample = sample.float()
        if self.cfg.normalization == "dataset_scale":
            mean_sq = sample.pow(2).sum(1).mean()
            self.input_scale.fill_(math.sqrt(self.cfg.d_in / max(mean_sq.item(), 1e-12)))
        normed, _ = self.normalize(sample)
        self.b_pre.copy_(geometric_median(normed[:max_median_points]))

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        self.W_dec.div_(torch.linalg.vector_norm(self.W_dec, dim=1, keepdim=True).clamp_min(1e-12))

    # ---------------------------------------------------------- normalisation
    def normalize(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Map raw activations to the space the autoencoder works in; returns what undoes it."""
        mode = self.cfg.normalization
        if mode == "none":
            return x, None
        if mode == "dataset_scale":
            return x * self.input_scale, None
        mu = x.mean(dim=-1, keepdim=True)
        centred = x - mu
        if mode == "layer_norm":  # OpenAI's released SAEs: LN without gain, unbiased std, eps 1e-5
            std = centred.std(dim=-1, keepdim=True)
            return centred / (std + 1e-5), (mu, std)
        norm = torch.linalg.vector_norm(centred, dim=-1, keepdim=True).clamp_min(1e-12)
        return centred / norm, (mu, norm)

    def denormalize(self, x_hat: Tensor, info: tuple[Tensor, Tensor] | None) -> Tensor:
        mode = self.cfg.normalization
        if mode == "none":
            return x_hat
        if mode == "dataset_scale":
            return x_hat / self.input_scale
        assert info is not None
        mu, norm = info
        return x_hat * norm + mu

    # -------------------------------------------------------------- inference
    def pre_activations(self, x_normed: Tensor) -> Tensor:
        return torch.addmm(self.b_enc, x_normed - self.b_pre, self.W_enc.t())

    def encode_normed(self, x_normed: Tensor, k: int | None = None) -> TopKCode:
        """The code of normalised inputs; `k` asks for test-time TopK (any architecture), else
        the architecture's own inference code (TopK at cfg.k, BatchTopK's JumpReLU, ReLU)."""
        if k is not None and not 0 < k <= self.cfg.n_latents:
            raise ValueError(f"k must be in [1, n_latents={self.cfg.n_latents}], got {k}")
        return self.activation.encode(self.pre_activations(x_normed), self.cfg, self.threshold, k)

    def decode_normed(self, code: TopKCode) -> Tensor:
        return sparse_decode(code.indices, code.values, self.W_dec) + self.b_pre

    def encode(self, x: Tensor, k: int | None = None) -> TopKCode:
        """Sparse code of raw activations x [batch, d_in]."""
        check_activations(x, self.cfg.d_in)
        x_normed, _ = self.normalize(x.float())
        return self.encode_normed(x_normed, k)

    def forward(self, x: Tensor, k: int | None = None) -> Tensor:
        """Reconstruction of raw activations x [batch, d_in], in the input's units."""
        check_activations(x, self.cfg.d_in)
        x_normed, info = self.normalize(x.float())
        x_hat = self.decode_normed(self.encode_normed(x_normed, k))
        return self.denormalize(x_hat, info)

    def dense_latents(self, x: Tensor, k: int | None = None) -> Tensor:
        """Latents as a dense [batch, n] tensor (for analysis of small batches only)."""
        code = self.encode(x, k)
        out = torch.zeros(x.shape[0], self.cfg.n_latents, device=x.device)
        return out.scatter_(1, code.indices, code.values)
