"""Console output: one copy of each line of a distributed run (from global rank 0), and errors
shown as one line."""

from __future__ import annotations

import sys


def say(message: str) -> None:
    """A line on stderr, at once: what the Ray Train controller tells the job's console (Ray
    forwards an actor's stderr to the driver) while it waits or decides on a restart."""
    print(message, file=sys.stderr, flush=True)


def print0(*args: object) -> None:
    """Print with the saescale prefix, once per run (rank 0, or a process outside any group).
    torch is not imported here (Ray Data's read tasks use this module and need no torch): a
    process group exists only where torch.distributed was imported."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_initialized() or dist.get_rank() == 0:
        print("[saescale]", *args, flush=True)


def one_line(message: BaseException | str) -> str:
    """The whole message on one line (pyarrow and boto put newlines in theirs)."""
    text = message if isinstance(message, str) else str(message)
    return " ".join(text.split()) or type(message).__name__


def first_line(error: BaseException | None) -> str:
    """An error's own first line (Ray appends retry advice and remote tracebacks on further
    lines); one that wraps another (Ray's RayTaskError keeps it in `.cause`) speaks through it."""
    while error is not None and isinstance(getattr(error, "cause", None), BaseException):
        error = error.cause
    return str(error).split("\n", 1)[0].strip()
