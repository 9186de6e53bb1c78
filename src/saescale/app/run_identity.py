"""A training run's identity: a readable name plus a short hash of the settings that define its result.

Output folders, Ray Train checkpoints and the sweep's skip-finished rule are keyed by
`run_id = <run_name>-<config_hash>`, so two runs that differ in any setting that changes the
trained SAE (say train.lr, which the readable name does not show) never share a folder or a
checkpoint, while rerunning the same command finds its own run again. Settings that do not change
the SAE (logging cadence, wandb, exports, paths, endpoints, memory hints, fault/debug hooks)
are left out: changing them still resumes the same run.

No Ray here: the job, the Hydra launcher and the sweep scheduler all import this.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from saescale import storage

# the config sections whose values define the trained SAE (the model is named by data.cache).
# Not the worker layout: a step reads the same rows on any layout (`data.streams`, resolved here:
# null means parallel.workers), so a run keeps its id when it moves to another layout (an elastic
# run, or one resumed on fewer workers after a node was lost). `parallel.use_gpu` is: the device
# decides AuxK's precision; `train.precision` too, so a precision sweep keeps its runs apart.
# Moving a run to another precision is deliberate: pass its run_id (the checkpoint records the
# precision it was written in).
IDENTITY_SECTIONS = ("sae", "train", "data", "parallel")
# keys of those sections that do not change the trained SAE
NOT_IDENTITY = {
    "train": (
        "log_every",
        "histogram_every",
        "checkpoint_every",
        "micro_batches",
        "sync_free",
        "sparse_kernels",
        "cuda_graphs",
    ),
    "data": (
        "endpoint_url",
        "heldout_tokens",
        "prefetch_batches",
        "lm_actors",
        "lm_actor_cpus",
        "cache_write",
        "heldout_cache",
    ),
    "parallel": ("workers", "tp", "elastic", "min_workers", "cpus_per_worker", "memory_per_worker_gib"),
}
# keys added after runs existed, left out of the hash at the value that reproduces the runs from
# before the key existed: such a run keeps its run_id (and resumes) when rerun with that value.
# All are the defaults but train.lr_rule, whose default changed the default lr: a run from before
# it is found again with train.lr_rule=paper
OMITTED_AT_DEFAULT = {
    "train": {"precision": "auto", "lr_rule": "paper", "lr_scale": 1.0},
    "sae": {"architecture": "topk", "l1_coef": 0.0},
}
HASH_CHARS = 8


def identity_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved settings the hash covers, as plain data (credentials dropped from the cache URL)."""
    out: dict[str, Any] = {}
    for section in IDENTITY_SECTIONS:
        node = cfg.get(section)
        if node is None:
            continue
        values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        for key in NOT_IDENTITY.get(section, ()):
            values.pop(key, None)
        for key, default in OMITTED_AT_DEFAULT.get(section, {}).items():
            if values.get(key) == default:
                values.pop(key)
        if section == "train" and values.get("lr") is not None:
            values.pop("lr_rule", None)  # the rule picks the default lr only: a set lr makes it moot
        out[section] = values
    data = out.get("data", {})
    if data.get("source") == "cache":  # the settings of the other source do not count (runs from
        data.pop("source")  # before data.source existed keep their id)
        data.pop("lm", None)
    elif "source" in data:  # model: the LM settings name the data; the cache is not read
        data.pop("cache", None)
        data.pop("holdout_shards", None)
        (data.get("lm") or {}).pop("model_cache_dir", None)  # where converted models are kept
    if "data" in out and data.get("streams") is None:  # the default: one stream per worker
        data["streams"] = (cfg.get("parallel") or {}).get("workers")
    if isinstance(data.get("cache"), str):
        data["cache"] = _without_credentials(data["cache"]).rstrip("/")
    return out


def _without_credentials(url: str) -> str:
    """`s3://key:secret@bucket/x` -> `s3://bucket/x`: rotating a credential keeps the run."""
    return storage.redact(url).replace("://***@", "://", 1)


def config_hash(cfg: Mapping[str, Any]) -> str:
    """Short hex digest of `identity_config(cfg)`; equal configs give equal hashes in any process."""
    text = json.dumps(identity_config(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_CHARS]


def local_run_dir(output_dir: str, run_id: str) -> str:
    """Where Hydra keeps a run's own files: `<output_dir>/hydra` when output_dir is local, else a
    local `$SAESCALE_RUNS/hydra/<run_id>` (Hydra writes with plain os calls, not fsspec; see
    `job_paths.local_side_dir`)."""
    from saescale.app.job_paths import local_side_dir

    local = storage.local_path(output_dir)
    if local is not None:
        return os.path.join(local, "hydra")
    return local_side_dir("hydra", run_id)


def _hash_of_root(*, _root_: DictConfig) -> str:
    return config_hash(_root_)


def register_resolvers() -> None:
    """`${saescale.config_hash:}` and `${saescale.local_run_dir:<output_dir>,<run_id>}` for the
    job configs; call before Hydra loads one (idempotent)."""
    if not OmegaConf.has_resolver("saescale.config_hash"):
        OmegaConf.register_new_resolver("saescale.config_hash", _hash_of_root)
    if not OmegaConf.has_resolver("saescale.local_run_dir"):
        OmegaConf.register_new_resolver("saescale.local_run_dir", local_run_dir)
