"""Train a TopK sparse autoencoder on cached activations, on Ray (embedded locally or a cluster).

    python jobs/train.py                                        # embedded default (make train)
    python jobs/train.py sae.n_latents=8192 parallel.workers=4 parallel.tp=2
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/train.py \
        data.cache=s3://bucket/cache/run1 storage.url=s3://bucket/runs parallel.workers=16 parallel.tp=8

Steps: open the activation cache (built by jobs/cache.py) and hold out its first shard(s);
check the (dp x tp) layout and the per-worker memory plan; run the Ray Train job (Ray Data
streams the other shards into the workers; per-rank checkpoints; a rerun of the same config, i.e.
the same run_id = <run_name>-<config hash>, resumes); gather the final SAE from the last checkpoint
one shard at a time; write the SAELens and sparsify exports (streamed from it) and evaluate NMSE on
the held-out tokens; log to wandb (rank 0 only).
"""

from __future__ import annotations

import json
import os
import sys
import time

from saescale.service.ray_local import apply_env_defaults

apply_env_defaults()  # before anything imports ray

import hydra  # noqa: E402
import psutil  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from saescale import storage  # noqa: E402
from saescale.data.reader import ActivationCache  # noqa: E402
from saescale.core.config import ConfigError, SAEConfig, TrainConfig  # noqa: E402
from saescale.distributed.mesh import MeshError, ParallelDims  # noqa: E402
from saescale.distributed.plan import PlanError, check_fits, plan_memory  # noqa: E402
from saescale.service.run_identity import config_hash, register_resolvers  # noqa: E402

register_resolvers()  # conf/train.yaml's ${saescale.config_hash:} and ${saescale.local_run_dir:...}


def print0(*args) -> None:
    print("[saescale]", *args, flush=True)


def absolute(url: str) -> str:
    """Workers run in another directory: make local paths absolute (URLs stay as they are)."""
    return url if "://" in url else os.path.abspath(url)


def endpoint_options(endpoint: str | None) -> dict | None:
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else None


def output_options(cfg: DictConfig, out: str) -> dict | None:
    """Storage options for output_dir: it shares storage.url's endpoint (the driver writes both)."""
    return endpoint_options(cfg.storage.endpoint_url) if "://" in out else None


def prepare(cfg: DictConfig):
    """Validate everything that can be checked before Ray starts; returns the launch spec."""
    from saescale.service.job_paths import check_job_paths  # refuses paths into Ray's working_dir copy

    check_job_paths(reads={"data.cache": cfg.data.cache},
                    writes={"output_dir": cfg.output_dir, "storage.url": cfg.storage.url})
    from saescale.service.ray_train import LaunchSpec
    from saescale.service.stream import plan_data

    cache_url, out = absolute(cfg.data.cache), absolute(cfg.output_dir)
    cache = ActivationCache(cache_url, endpoint_options(cfg.data.endpoint_url))
    manifest = cache.manifest
    n_shards = len(manifest.shards)
    if n_shards <= cfg.data.holdout_shards:
        raise ConfigError(f"the cache has {n_shards} shard(s); need more than data.holdout_shards={cfg.data.holdout_shards}")
    train_shards = list(range(cfg.data.holdout_shards, n_shards))
    sae_cfg = SAEConfig(d_in=manifest.d_model, **OmegaConf.to_container(cfg.sae))
    dims = ParallelDims.from_world(cfg.parallel.workers, cfg.parallel.tp)
    dims.validate(sae_cfg.n_latents, cfg.train.batch_size)

    _, cache_root = storage.url_to_fs(cache_url, cache.storage_options)
    files = [f"{cache_root.rstrip('/')}/{manifest.shards[s].file}" for s in train_shards]
    rows = sum(manifest.shards[s].rows for s in train_shards)
    data = plan_data(rows, files, cfg.train.batch_size, dims.world_size, cfg.train.epochs, cfg.train.seed,
                     sha256=[manifest.shards[s].sha256 for s in train_shards],
                     sizes=[manifest.shards[s].bytes for s in train_shards])
    total_steps = min(data.total_steps, cfg.train.max_steps or data.total_steps)
    train_keys = ("lr", "warmup_steps", "decay_start_frac", "clip_grad_norm", "ema_decay", "seed", "log_every",
                  "histogram_every", "checkpoint_every")
    train_cfg = TrainConfig(total_steps=total_steps, **{k: cfg.train[k] for k in train_keys})

    memory = cfg.parallel.memory_per_worker_gib or psutil.virtual_memory().total / 2**30 / dims.world_size
    plan = plan_memory(sae_cfg.n_latents, sae_cfg.d_in, sae_cfg.k, dims.world_size, dims.tp, cfg.train.batch_size,
                       ema=bool(cfg.train.ema_decay), device_gib=memory)
    print0("memory plan per worker:\n" + plan.table())
    check_fits(plan)

    local_out = out if "://" not in out else absolute(os.path.join(os.environ.get("SAESCALE_RUNS", "runs"), cfg.run_id))
    os.makedirs(local_out, exist_ok=True)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    run_config["data"]["cache"] = storage.redact(run_config["data"]["cache"])  # never a secret in wandb
    wandb = None
    if cfg.wandb.enabled and cfg.wandb.mode != "disabled":
        tags = list(cfg.wandb.tags) + [f"N={sae_cfg.n_latents}", f"k={sae_cfg.k}", f"model={manifest.model}",
                                        f"hook={manifest.hook}.{manifest.layer}", f"tp={dims.tp}", f"dp={dims.dp}"]
        wandb = {"project": cfg.wandb.project, "name": cfg.run_id, "group": cfg.wandb.group, "tags": tags,
                 "config": run_config, "mode": cfg.wandb.mode, "dir": local_out, "run_id": cfg.run_id}
    record = os.path.join(local_out, "rows") if cfg.debug.record_rows else None
    if record:
        os.makedirs(record, exist_ok=True)
    fault = dict(cfg.fault, marker=os.path.join(local_out, ".fault-injected")) if cfg.fault.step is not None else None
    worker_config = {
        "sae": sae_cfg.to_dict(), "train": train_cfg.to_dict(), "tp": dims.tp,
        "threads_per_worker": max(1, int(cfg.parallel.cpus_per_worker)), "use_gpu": bool(cfg.parallel.use_gpu),
        "cache": {"url": cache_url, "options": cache.storage_options, "dtype": manifest.dtype,
                  "init_shard": train_shards[0]},
        "data": vars(data), "seed": cfg.train.seed, "shuffle_buffer_rows": cfg.data.shuffle_buffer_rows,
        "prefetch_batches": cfg.data.prefetch_batches, "checkpoint_every": cfg.train.checkpoint_every,
        "logging": {"jsonl": os.path.join(local_out, "metrics.jsonl"), "wandb": wandb},
        "fault": fault, "record_rows_dir": record,
    }
    # the Ray Train run name keys the checkpoints: another config never resumes this run's
    spec = LaunchSpec(planned_bytes=plan.total, run_name=cfg.run_id, storage_url=absolute(cfg.storage.url),
                      storage_options=endpoint_options(cfg.storage.endpoint_url), workers=dims.world_size,
                      tp=dims.tp, cpus_per_worker=cfg.parallel.cpus_per_worker, use_gpu=cfg.parallel.use_gpu,
                      max_failures=cfg.ray.max_failures, worker_config=worker_config)
    print0(f"cache {storage.redact(cfg.data.cache)}: {manifest.n_rows} rows of {manifest.model} "
           f"{manifest.hook}.{manifest.layer}; training on {len(train_shards)} shards ({rows} rows), "
           f"{total_steps} steps of {cfg.train.batch_size} over dp={dims.dp} x tp={dims.tp} workers")
    return spec, cache, manifest, sae_cfg, out


def evaluate_and_export(cfg: DictConfig, cache: ActivationCache, meta: dict, sae_url: str, out: str) -> dict:
    """The exports asked for (streamed from the gathered SAE, whatever its size), then, with
    export.evaluate, the held-out NMSE (which loads the whole SAE into the driver's memory)."""
    import torch

    from saescale.formats.export import export_saelens, export_sparsify
    from saescale.formats.saved import load_sae

    options = output_options(cfg, out)
    peer_meta = {k: v for k, v in meta.items() if k != "cache"}  # what the peer formats describe
    if cfg.export.saelens:
        export_saelens(sae_url, storage.join(out, "export", "saelens"), peer_meta, options)
    if cfg.export.sparsify:
        export_sparsify(sae_url, storage.join(out, "export", "sparsify"), options)
    if not cfg.export.evaluate:
        return {}
    sae, _ = load_sae(sae_url, storage_options=options)
    heldout = torch.cat([cache.read_shard(s) for s in range(cfg.data.holdout_shards)])[: cfg.data.heldout_tokens]
    with torch.no_grad():
        recon = sae(heldout)
    nmse = (((recon - heldout) ** 2).mean() / ((heldout - heldout.mean(0)) ** 2).mean()).item()
    return {"heldout_nmse": nmse}


@hydra.main(config_path="../conf", config_name="train", version_base=None)
def main(cfg: DictConfig) -> dict:
    from saescale.service.ray_local import ensure_ray

    try:
        spec, cache, manifest, sae_cfg, out = prepare(cfg)
    except (ConfigError, MeshError, PlanError, storage.StorageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print0(f"run {cfg.run_id} -> {storage.redact(out)}")

    import ray.train

    from saescale.service.ray_train import checkpoint_url, launch
    from saescale.service.stream import corrupt_shard_line, find_corrupt_shard, rebuild_hint
    from saescale.train.checkpoint import export_gathered

    started = time.time()
    ensure_ray(cfg.ray.address, num_cpus=int(spec.workers * spec.cpus_per_worker) + 2)
    try:
        result = launch(spec)
    except ray.train.TrainingFailedError as exc:
        corrupt = find_corrupt_shard(exc)
        if corrupt is not None:  # bad input, not a crash: one line with the remedy, no restarts were spent
            remedy = rebuild_hint(spec.worker_config["cache"]["url"], manifest.build_config, cfg.data.endpoint_url)
            print(f"error: {corrupt_shard_line(corrupt, spec.worker_config['cache']['url'], remedy)}",
                  file=sys.stderr)
            sys.exit(2)
        print(f"error: training failed after {cfg.ray.max_failures} restart(s): {exc}", file=sys.stderr)
        sys.exit(1)
    final = dict(result.metrics or {})
    ckpt = checkpoint_url(result, spec.storage_url)
    sae_url = storage.join(out, "sae")
    meta = {"model_name": manifest.model, "hook_name": f"{manifest.hook}.{manifest.layer}",
            "context_size": manifest.context_length, "corpus": manifest.corpus, "cache": storage.redact(cfg.data.cache)}
    export_gathered(ckpt, sae_url, meta, spec.storage_options)
    tokens = final.get("tokens") or 0
    # config_hash marks which config finished here: a sweep skips the run only when it matches
    summary = {"run_name": cfg.run_name, "run_id": cfg.run_id, "config_hash": config_hash(cfg),
               "steps": final.get("step"), "tokens": final.get("tokens"),
               "n_latents": sae_cfg.n_latents, "k": sae_cfg.k, "dp": spec.workers // spec.tp, "tp": spec.tp,
               "model": manifest.model, "hook": f"{manifest.hook}.{manifest.layer}", "d_in": sae_cfg.d_in,
               # dense-equivalent training FLOPs: the encoder GEMM forward + backward dominates
               "compute": 6.0 * tokens * sae_cfg.d_in * sae_cfg.n_latents,
               "tokens_to_convergence": final.get("tokens_to_convergence"),
               "train_wall_s": round(time.time() - started, 1),
               "dead_fraction": final.get("dead_fraction"), "train_fvu": final.get("fvu"),
               "data_wait_frac": final.get("data_wait_frac"), "comm_bytes_per_step": final.get("comm_bytes_per_step"),
               "time_split_s": {k: final.get(f"total_{k}_s") for k in ("data_wait", "compute", "comm")},
               "startup_wait_s": final.get("startup_wait_s"), "peak_rss_mb_rank0": final.get("peak_rss_mb_rank0"),
               "planned_mb_per_rank": round(spec.planned_bytes / 2**20, 1),
               "checkpoint": storage.redact(ckpt)}
    summary.update(evaluate_and_export(cfg, cache, meta, sae_url, out))
    storage.write_json_atomic(storage.join(out, "result.json"), summary, output_options(cfg, out))
    print0(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
