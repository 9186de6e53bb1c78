"""Optimiser pieces on their own: the decoder-gradient projection."""

from __future__ import annotations

import torch

from saescale.train.optim import remove_parallel_grad_


def test_remove_parallel_grad_leaves_only_the_orthogonal_part():
    """Each row's gradient loses exactly its component along the (unit-norm) row. 2048 columns
    make the function work in 512-row chunks, so 1200 rows also cross chunk boundaries."""
    g = torch.Generator().manual_seed(0)
    w_dec = torch.randn(1200, 2048, generator=g)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    grad = torch.randn(1200, 2048, generator=g) + 10.0 * w_dec  # a sizeable parallel part
    w64, g64 = w_dec.double(), grad.double()
    orthogonal = g64 - (g64 * w64).sum(1, keepdim=True) * w64  # computed independently, in float64
    assert (g64 * w64).sum(1).abs().min() > 1.0  # the test starts from a real parallel component

    out = grad.clone()
    remove_parallel_grad_(w_dec, out)

    along_row = (out.double() * w64).sum(1)
    torch.testing.assert_close(along_row, torch.zeros_like(along_row), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.double(), orthogonal, rtol=0, atol=1e-5)


def test_remove_parallel_grad_keeps_an_orthogonal_gradient():
    g = torch.Generator().manual_seed(1)
    w_dec = torch.randn(64, 32, generator=g)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    grad = torch.randn(64, 32, generator=g)
    grad -= (grad * w_dec).sum(1, keepdim=True) * w_dec
    out = grad.clone()
    remove_parallel_grad_(w_dec, out)
    torch.testing.assert_close(out, grad, rtol=0, atol=1e-6)
