"""The cache builder's parts computed on a Ray Data actor pool: one LM replica per actor (a GPU
each when the cluster has them), passed to `data.builder.build_cache` as its part runner."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from saescale.data.builder import CacheConfig, Plan, compute_part
from saescale.service.ray_local import ensure_ray


def actor_replica(cfg: CacheConfig) -> torch.nn.Module:
    """An LM actor's model: on its GPU when Ray gave it one, else on the CPUs it reserved
    (Ray sets OMP_NUM_THREADS to them)."""
    from saescale.lm.models import load_causal_lm

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    model = load_causal_lm(cfg.model, cfg.model_cache_dir).model
    return model.to("cuda") if torch.cuda.is_available() else model


class PartWorker:
    """A Ray Data actor: one model replica that computes whole parts."""

    def __init__(self, cfg_dict: dict[str, Any], plan: Plan) -> None:
        self.cfg = CacheConfig(**cfg_dict)
        self.plan = plan
        self.model = actor_replica(self.cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts = batch["part"].tolist()
        rows = [compute_part(self.model, self.cfg, self.plan, p) for p in parts]
        return {"part": np.array(parts), "rows": np.array(rows)}


def ray_part_runner(cfg: CacheConfig, plan: Plan, todo: list[int], on_rows: Callable[[int], None]) -> None:
    """Compute `todo` on `cfg.num_workers` actors of the (embedded or joined) Ray cluster."""
    import ray

    ensure_ray()
    ds = ray.data.from_items([{"part": p} for p in todo])
    resources = ray.cluster_resources()
    # one model replica per actor: a GPU each when the cluster has them, else a CPU share
    per_actor = (
        {"num_gpus": 1}
        if resources.get("GPU", 0) >= cfg.num_workers
        else {"num_cpus": max(1, int(resources.get("CPU", 1)) // cfg.num_workers)}
    )
    out = ds.map_batches(
        PartWorker,
        fn_constructor_kwargs={"cfg_dict": asdict(cfg), "plan": plan},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=cfg.num_workers),
        **per_actor,
    )
    for row in out.iter_rows():
        on_rows(int(row["rows"]))
