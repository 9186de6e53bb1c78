"""Sparse kernels for TopK autoencoders, each tested against a dense eager reference."""

from saescale.kernels.dead_block import (
    DeadBlock,
    dead_block_capacity,
    dead_block_width,
    dead_slots,
    resolve_aux_dtype,
    use_dense_block,
)
from saescale.kernels.sparse import (
    LatentOrder,
    RaggedCode,
    latent_sums,
    rows_by_latent_,
    sparse_decode,
    values_grad,
    whole_bag_fits,
)

__all__ = [
    "DeadBlock",
    "dead_block_capacity",
    "dead_block_width",
    "dead_slots",
    "LatentOrder",
    "RaggedCode",
    "latent_sums",
    "resolve_aux_dtype",
    "rows_by_latent_",
    "sparse_decode",
    "use_dense_block",
    "values_grad",
    "whole_bag_fits",
]
