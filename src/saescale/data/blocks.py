"""The shuffle buffer as fixed blocks, so a stream can be resumed at any step.

A stream's rows are grouped `block_steps` steps at a time (about `data.shuffle_buffer_rows` rows)
and each block's rows are permuted by a seed of (run seed, stream, block). Nothing crosses a
block, so the rows of step s are a pure function of the seed: a run resumed at step s reads from
the start of the block holding s and drops the steps before s in it (at most block_steps - 1),
instead of replaying the stream from its first row as a sliding shuffle buffer would need (on S3
that replay grew with the step: 35 s at step 2,850 of the default 30-epoch run). Both data
sources use it: the cache's streams (`service.stream`) and the model stream's blocks
(`data.model_stream`).
"""

from __future__ import annotations

import numpy as np


def block_steps(stream_batch: int, buffer_rows: int) -> int:
    """Steps per block: about `buffer_rows` (data.shuffle_buffer_rows) rows of each stream."""
    return max(1, -(-buffer_rows // stream_batch))


def block_permutation(seed: int, stream: int, block: int, rows: int) -> np.ndarray:
    """The order of a block's rows (a pure function of run seed, stream and block)."""
    return np.random.default_rng([seed, stream, block]).permutation(rows)


def resume_block(start_step: int, steps_per_block: int) -> tuple[int, int]:
    """(the block holding `start_step`, how many of its steps were trained already)."""
    block = start_step // steps_per_block
    return block, start_step - block * steps_per_block
