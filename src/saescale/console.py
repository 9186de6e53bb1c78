"""Console output of a distributed run: one copy of each line, from global rank 0."""

from __future__ import annotations

import torch.distributed as dist


def print0(*args: object) -> None:
    """Print with the saescale prefix, once per run (rank 0, or a process outside any group)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print("[saescale]", *args, flush=True)
