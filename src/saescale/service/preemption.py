"""Preemption notices in a Ray Train worker: SIGTERM, which is what a spot reclaim and
Kubernetes send a process seconds before it goes; and Ray's own notice, a node of the worker
group being drained (`ray_notice`), which an autoscaler sends when a cloud announces a reclaim.

Ray's worker processes exit on SIGTERM (`Worker.main_loop` installs that handler), so a notice
would be a crash: the worker group restarts from its last periodic checkpoint, losing every
step since, and the restart counts against `ray.max_failures`. Instead, in a process that
trains, the first SIGTERM only records the notice; the training loop (`Trainer.fit`'s
`stop_requested`) agrees across the ranks to stop at the next step boundary, every rank
checkpoints there and raises `Preempted`; the controller's failure policy
(`service.failures`) restarts the group from that checkpoint without counting a failure. A
second SIGTERM, and SIGTERM to any process that does not train, go to Ray's own handler.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

_training = threading.Event()  # this process runs a training loop
_notice = threading.Event()  # a SIGTERM arrived while it did
_ray_notice_said = threading.Event()  # Ray's notice was announced on this worker


class Preempted(RuntimeError):
    """Every rank checkpointed after a preemption notice and left: restart from that checkpoint."""


def watch_sigterm() -> None:
    """Route SIGTERM through `_on_sigterm` in this worker process. Runs in Ray's worker setup
    hook, before `Worker.main_loop` sets Ray's handler: Ray's setter is wrapped, so the handler
    it installs becomes the one a notice falls back to (Ray 2.60's `set_sigterm_handler`, pinned
    in constraints.txt)."""
    from ray._private import utils

    if getattr(utils.set_sigterm_handler, "_saescale", False):
        return
    install = utils.set_sigterm_handler

    def set_sigterm_handler(handler: Any) -> None:
        def on_sigterm(signum: int, frame: Any) -> None:
            if _training.is_set() and not _notice.is_set():
                _notice.set()
                print(
                    "[saescale] SIGTERM: a preemption notice; every rank checkpoints at the next step and the "
                    "run resumes from there (a second SIGTERM ends this worker now)",
                    file=sys.stderr,
                    flush=True,
                )
                return
            handler(signum, frame)

        install(on_sigterm)

    set_sigterm_handler._saescale = True  # type: ignore[attr-defined]
    utils.set_sigterm_handler = set_sigterm_handler


def start_training() -> None:
    """Mark this process as a training worker (only those take a SIGTERM as a notice)."""
    _notice.clear()
    _ray_notice_said.clear()
    _training.set()


def stop_training() -> None:
    """The loop ended: from here a SIGTERM is Ray's again (it stops a worker group that way)."""
    _training.clear()


def ray_notice() -> Any | None:
    """Ray Train's own notice (`PreemptionInfo`), or None: its PreemptionWatcher marks every worker
    of the group when a node the group uses is being drained (a spot reclaim an autoscaler
    announced; `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`). Read from this worker's
    train context: the public `ray.train.get_preemption_info()` is a collective on every call,
    and `Trainer.fit` already agrees on stopping across the ranks at every step."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().preemption_context.preemption_info
    except Exception:  # noqa: BLE001 - not in a Ray Train worker, or another Ray (constraints pin 2.60)
        return None


def noticed() -> bool:
    """Whether a preemption notice arrived, a SIGTERM or Ray's (checked by the training loop at
    every step)."""
    if _notice.is_set():
        return True
    info = ray_notice() if _training.is_set() else None
    if info is None:
        return False
    if not _ray_notice_said.is_set():
        _ray_notice_said.set()
        deadline = f", deadline in {info.deadline_ms / 1000 - time.time():.0f} s" if info.deadline_ms else ""
        print(
            f"[saescale] preemption notice from Ray: node(s) {', '.join(n[:12] for n in info.preempted_node_ids)} "
            f"draining (ranks {info.preempted_ranks}{deadline}); every rank checkpoints at the next step and "
            "the run resumes from there",
            file=sys.stderr,
            flush=True,
        )
    return True
