"""The model stream on Ray Data (`data.source=model`): a rank's blocks (`data.model_stream`)
computed by a pool of LM actors, one model replica each, and read by the rank in order.

Ray Data gives what the stream needs: an actor pool that loads the model once per actor (a GPU
each when the cluster has GPUs), backpressure (the actors run ahead of training only as far as
the object store budget allows), order kept (`preserve_order`) however many actors there are,
and a dead actor restarted with its task retried; as a block is a pure function of its item,
a retried one gives the same rows. Each rank builds its own pipeline from the step it resumes at.
"""

from __future__ import annotations

import os
import signal
import warnings
from typing import Any

import numpy as np

from saescale.data.builder import CacheConfig
from saescale.data.model_stream import ModelStream, rank_block
from saescale.service.cache_actors import actor_replica
from saescale.service.stream import set_stream_context


class BlockWorker:
    """A Ray Data actor: one LM replica computing a rank's blocks."""

    def __init__(
        self, lm: dict[str, Any], stream: ModelStream, streams: range, write: dict | None, fault: dict | None
    ) -> None:
        import ray

        self.cfg = CacheConfig(**lm)
        self.write = CacheConfig(**write) if write else None
        if isinstance(stream, ray.ObjectRef):  # one copy of the plan in the object store
            stream = ray.get(stream)
        self.stream, self.streams, self.fault = stream, streams, fault
        self.model = actor_replica(self.cfg)
        self.memo: dict[int, Any] = {}  # the last block's chunks: the next block starts in one

    def __call__(self, batch: dict[str, np.ndarray]):
        import pyarrow as pa

        for b in batch["block"]:
            self._maybe_die(int(b))
        tables = [
            rank_block(self.model, self.cfg, self.stream, self.streams, int(b), int(skip), self.write, self.memo)
            for b, skip in zip(batch["block"], batch["skip"])
        ]
        return pa.concat_tables(tables)

    def _maybe_die(self, block: int) -> None:
        """Test hook (`fault.lm_actor_block`): SIGKILL this actor once, as it starts the block."""
        fault = self.fault or {}
        if fault.get("block") != block or os.path.exists(fault["marker"]):
            return
        with open(fault["marker"], "w") as handle:
            handle.write(str(block))
        os.kill(os.getpid(), signal.SIGKILL)


def actor_gpus(workers: int, actors_per_worker: int, workers_use_gpu: bool) -> bool:
    """Whether the LM actors take a GPU each: only when the cluster has one for every actor
    beside the training workers' own (else an actor pool would wait for a GPU forever)."""
    import ray

    need = workers * actors_per_worker + (workers if workers_use_gpu else 0)
    return ray.cluster_resources().get("GPU", 0) >= need


# a dead LM actor is restarted (its block retried, with the same rows) this many times; one that
# dies every time (out of memory) fails the read, and the run says so, instead of hanging
ACTOR_RESTARTS = 3


def rank_dataset(
    lm: dict[str, Any],
    stream: ModelStream,
    streams: range,
    start_step: int,
    actors: int,
    lm_cpus: float,
    write: dict | None = None,
    total_steps: int | None = None,
    fault: dict | None = None,
    gpus: bool = False,
):
    """The Ray Dataset of a rank's share of every step from `start_step` to `total_steps`
    (default: the stream's; rows in step order: batch it by `stream_batch * len(streams)`)."""
    import ray
    import ray.data
    from ray.util.annotations import RayDeprecationWarning

    set_stream_context()
    plan = ray.get(stream) if isinstance(stream, ray.ObjectRef) else stream
    items = plan.items(total_steps or plan.data.total_steps, start_step)
    if not items:
        raise ValueError(f"internal: no steps left to stream after step {start_step}")
    constructor = {"lm": lm, "stream": stream, "streams": streams, "write": write, "fault": fault}
    with warnings.catch_warnings():  # Ray 2.60 has no named parameter for the restart bound
        warnings.simplefilter("ignore", RayDeprecationWarning)
        return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            BlockWorker,
            fn_constructor_kwargs=constructor,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=actors),
            max_restarts=ACTOR_RESTARTS,
            max_task_retries=ACTOR_RESTARTS,
            **({"num_gpus": 1} if gpus else {"num_cpus": lm_cpus}),
        )
