"""Synthetic activations from a known sparse dictionary: the ground truth for recovery tests."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SparseDictionary:
    """x = sum of `active` atoms (unit norm) with exponential coefficients, plus Gaussian noise."""

    atoms: Tensor  # [n_atoms, d]
    active: int
    noise: float
    seed: int

    @classmethod
    def random(cls, d: int, n_atoms: int, active: int, noise: float = 0.01, seed: int = 0) -> SparseDictionary:
        g = torch.Generator().manual_seed(seed)
        atoms = torch.randn(n_atoms, d, generator=g)
        atoms /= atoms.norm(dim=1, keepdim=True)
        return cls(atoms=atoms, active=active, noise=noise, seed=seed)

    def sample(self, batch: int, generator: torch.Generator) -> Tensor:
        n_atoms, d = self.atoms.shape
        idx = torch.rand(batch, n_atoms, generator=generator).topk(self.active, dim=1).indices
        coef = torch.empty(batch, self.active).exponential_(1.0, generator=generator) + 0.5
        x = torch.einsum("bk,bkd->bd", coef, self.atoms[idx])
        return x + self.noise * torch.randn(batch, d, generator=generator)

    def batches(self, batch: int, steps: int, seed: int | None = None) -> Iterator[Tensor]:
        g = torch.Generator().manual_seed(self.seed + 1 if seed is None else seed)
        for _ in range(steps):
            yield self.sample(batch, g)

    def recovery(self, decoder_rows: Tensor, threshold: float = 0.9) -> float:
        """Fraction of true atoms whose best-matching decoder row has cosine > threshold."""
        dec = decoder_rows / decoder_rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        best = (self.atoms @ dec.t()).max(dim=1).values
        return (best > threshold).float().mean().item()
