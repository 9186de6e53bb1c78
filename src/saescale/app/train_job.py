"""The training job (`python jobs/train.py`): check everything that can be checked before Ray
starts, run the Ray Train service, then gather, export and evaluate, and write result.json.

Steps: open the activation cache (built by jobs/cache.py) and hold out its first shard(s); check
the (dp x tp) layout and the per-worker memory plan; run the Ray Train job (Ray Data streams the
other shards into the workers; per-rank checkpoints; a rerun of the same config, i.e. the same
run_id, resumes); gather the final SAE from the last checkpoint one shard at a time; write the
SAELens and sparsify exports (streamed from it) and, with export.evaluate, the held-out NMSE;
log to wandb (rank 0 only). Every local path is made absolute: Ray workers run elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import time
from dataclasses import dataclass
from typing import Any

import psutil
import torch
from omegaconf import DictConfig, OmegaConf

from saescale import retry, storage
from saescale.app.errors import EXIT_FAILED, fail
from saescale.app.job_paths import check_job_paths, local_side_dir
from saescale.app.model_source import ModelSource, finish_model_source, prepare_model_source
from saescale.app.run_identity import config_hash
from saescale.app.schema import TrainJobConfig
from saescale.console import first_line, print0
from saescale.core.arch import activation
from saescale.core.config import ConfigError, SAEConfig, TrainConfig
from saescale.data.blocks import block_steps
from saescale.data.format import ITEMSIZES, CorruptShardError
from saescale.data.manifest import Manifest
from saescale.data.reader import ActivationCache
from saescale.distributed.layouts import Layout, candidate_layouts
from saescale.distributed.mesh import ParallelDims
from saescale.distributed.plan import PlanError, check_fits, plan_memory
from saescale.service.ray_train import DATA_CPUS, LaunchSpec
from saescale.service.stream import plan_data, prefetch_blocks, rebuild_hint
from saescale.sweeps.scaling import FLOPS_PER_TOKEN_DN
from saescale.train.precision import resolve_precision


@dataclass
class PreparedRun:
    """What the driver knows once every check passed: the launch spec and what the end needs."""

    spec: LaunchSpec
    heldout: ActivationCache  # the held-out rows' cache: data.cache, or the model stream's own
    heldout_shards: list[int]
    manifest: Manifest  # the cache's, or one describing the model stream
    source: ModelSource | None  # data.source=model
    sae_cfg: SAEConfig
    train_cfg: TrainConfig
    output_dir: str  # absolute path or URL
    output_options: dict[str, Any] | None


def typed(cfg: DictConfig) -> TrainJobConfig:
    """The composed config as the schema's dataclasses (their checks run here)."""
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


# Ray's memory monitor kills workers above 95% of the node's memory; the driver, Ray's own
# processes, Ray Data's blocks and the OS take about this much beside the workers (measured: the
# monitor counted 24.0 GB used when two 2^20-latent workers held 9.6 GB each, i.e. 4.5 GiB else).
RAY_MEMORY_THRESHOLD = 0.95
RAY_SIDE_GIB = 5.0


def crash_line(message: str, restarts: int, planned_bytes: int) -> str:
    """One readable line for a run that crashed through its restarts (Ray's own message can be
    pages long, e.g. its memory monitor's list of every process)."""
    if "running low on memory" in message:
        return (
            f"training failed after {restarts} restart(s): Ray's memory monitor killed the workers "
            f"(planned {planned_bytes / 2**30:.2f} GiB per worker); lower sae.n_latents or train.batch_size, "
            "raise train.micro_batches, or run on more or bigger nodes (set parallel.memory_per_worker_gib "
            "to what a worker really has)"
        )
    first = message.strip().split("\n", 1)[0]
    return f"training failed after {restarts} restart(s): {first[:400]}{'...' if len(first) > 400 else ''}"


def local_worker_memory_gib(workers: int) -> float:
    """Memory each worker of a one-machine (CPU) run may plan for: what Ray's OOM killer allows,
    less the driver's and Ray's share, split over the workers."""
    total = psutil.virtual_memory().total / 2**30
    return max(total * RAY_MEMORY_THRESHOLD - RAY_SIDE_GIB, 0.5) / workers


def engine_configs(job: TrainJobConfig, d_in: int, total_steps: int) -> tuple[SAEConfig, TrainConfig]:
    """The engine's SAE and train configs from the job's sections (validated on construction)."""
    sae = SAEConfig(d_in=d_in, **vars(job.sae))
    activation(sae.architecture).check(sae)  # e.g. ReLU without an L1 penalty: before Ray starts
    train_keys = {k: v for k, v in vars(job.train).items() if k not in ("batch_size", "epochs", "max_steps")}
    budget = total_steps * job.train.batch_size  # the default lr follows the run's token budget
    return sae, TrainConfig(
        total_steps=total_steps, budget_tokens=budget, checkpoint_mtbf_s=job.ray.mtbf_s, **train_keys
    )


def prepare(cfg: DictConfig, job: TrainJobConfig) -> PreparedRun:
    """Validate everything that can be checked before Ray starts; returns the launch spec."""
    retry.set_budget(job.storage.retry_s)
    writes = {"output_dir": job.output_dir, "storage.url": job.storage.url}
    if job.data.cache_write:
        writes["data.cache_write"] = job.data.cache_write
    check_job_paths(reads={"data.cache": job.data.cache} if job.data.source == "cache" else {}, writes=writes)
    out = storage.absolute(job.output_dir)
    dims = ParallelDims.from_world(job.parallel.workers, job.parallel.tp)
    dims.validate(job.sae.n_latents, job.train.batch_size)
    streams = job.data.streams or dims.world_size
    if streams % dims.world_size:
        raise ConfigError(
            f"parallel.workers={dims.world_size} must divide data.streams={streams}: each worker reads a whole "
            "number of the run's streams"
        )
    if job.data.source == "model":
        source = prepare_model_source(job, out, streams)
        data, manifest, cache, cache_url = source.data, source.manifest(), None, None
        heldout, heldout_shards = source.heldout, list(range(len(source.heldout.manifest.shards)))
        train_shards = []
    else:
        source = None
        cache_url = storage.absolute(job.data.cache)
        cache = ActivationCache(cache_url, storage.endpoint_options(job.data.endpoint_url))
        manifest = cache.manifest
        n_shards = len(manifest.shards)
        if n_shards <= job.data.holdout_shards:
            raise ConfigError(
                f"the cache has {n_shards} shard(s); need more than data.holdout_shards={job.data.holdout_shards}"
            )
        train_shards = list(range(job.data.holdout_shards, n_shards))
        heldout, heldout_shards = cache, list(range(job.data.holdout_shards))
        _, cache_root = storage.url_to_fs(cache_url, cache.storage_options)
        files = [f"{cache_root.rstrip('/')}/{manifest.shards[s].file}" for s in train_shards]
        data = plan_data(
            files,
            [manifest.shards[s].rows for s in train_shards],
            job.train.batch_size,
            streams,
            job.train.epochs,
            job.train.seed,
            sha256=[manifest.shards[s].sha256 for s in train_shards],
            sizes=[manifest.shards[s].bytes for s in train_shards],
        )
    total_steps = min(data.total_steps, job.train.max_steps or data.total_steps)
    sae_cfg, train_cfg = engine_configs(job, manifest.d_model, total_steps)

    # the workers resolve precision "auto" on their own devices; the driver plans for the same kind
    precision = train_cfg.precision
    if precision == "auto":
        precision = "bf16" if job.parallel.use_gpu else resolve_precision("auto", torch.device("cpu"))

    itemsize = ITEMSIZES[manifest.dtype]

    def data_bytes(layout: Layout) -> int:
        """What a rank's data iterators hold, in the cache dtype: the model stream, its
        prefetched batches (it shuffles in its actors); the cache's streams, each its block being
        trained on, that block's shuffled copy and its prefetched blocks (`data.blocks`)."""
        owned = data.streams // layout.workers
        if source:
            return owned * (job.data.prefetch_batches + 1) * data.stream_batch * manifest.d_model * itemsize
        per_block = block_steps(data.stream_batch, job.data.shuffle_buffer_rows)
        blocks = prefetch_blocks(job.data.prefetch_batches, per_block) + 2
        return owned * blocks * per_block * data.stream_batch * manifest.d_model * itemsize

    def plan_for(layout: Layout):
        return plan_memory(
            sae_cfg.n_latents,
            sae_cfg.d_in,
            sae_cfg.k,
            layout.workers,
            layout.tp,
            job.train.batch_size,
            micro_batches=train_cfg.micro_batches,
            ema=bool(train_cfg.ema_decay),
            device_gib=job.parallel.memory_per_worker_gib or local_worker_memory_gib(layout.workers),
            precision=precision,
            k_aux=sae_cfg.k_aux,
            data_bytes=data_bytes(layout),
        )

    plan = plan_for(Layout(dims.world_size, dims.tp))
    print0("memory plan per worker:\n" + plan.table())
    check_fits(plan)
    background = job.storage.checkpoint_in_background
    copy_bytes = plan.weights + plan.adam + plan.ema  # a background checkpoint's host copy
    if background and not job.parallel.use_gpu and plan.total + copy_bytes > plan.device_bytes:
        background = False  # the copy lives in the same memory as the training state on a CPU worker
        print0(
            f"checkpoints are written in the training thread: a background checkpoint's copy "
            f"({copy_bytes / 2**30:.2f} GiB per worker) does not fit beside the plan"
        )
    layouts = [Layout(dims.world_size, dims.tp, plan.micro_batches)] + smaller_layouts(job, streams, plan_for)
    if job.parallel.elastic:
        print0("elastic: the run may take " + ", ".join(map(str, layouts)))
    train_cfg = dataclasses.replace(train_cfg, micro_batches=plan.micro_batches)  # "auto" -> the plan's

    # files only the driver and rank 0 write (metrics, wandb, debug rows): local even for a remote
    # output_dir (metrics.jsonl is copied there at the end)
    local_out = storage.local_path(out) or local_side_dir(job.run_id)
    os.makedirs(local_out, exist_ok=True)
    if storage.is_remote(out):
        print0(f"metrics, offline wandb and Hydra files of this run: {local_out}")
    wandb = None
    if job.wandb.active:
        run_config = OmegaConf.to_container(cfg, resolve=True)
        run_config = json.loads(storage.redact(json.dumps(run_config)))  # no URL credentials in wandb
        tags = list(job.wandb.tags) + [
            f"N={sae_cfg.n_latents}",
            f"k={sae_cfg.k}",
            f"model={manifest.model}",
            f"hook={manifest.hook}.{manifest.layer}",
            f"tp={dims.tp}",
            f"dp={dims.dp}",
        ]
        wandb = {
            "project": job.wandb.project,
            "name": job.run_id,
            "group": job.wandb.group,
            "tags": tags,
            "config": run_config,
            "mode": job.wandb.mode,
            "dir": local_out,
            "run_id": job.run_id,
        }
    record = os.path.join(local_out, "rows") if job.debug.record_rows else None
    if record:
        os.makedirs(record, exist_ok=True)
    fault = None
    if job.fault.step is not None or job.fault.hold_steps or job.fault.lm_actor_block is not None:
        fault = {
            **vars(job.fault),
            "hold_steps": list(job.fault.hold_steps),
            "hold_dir": local_out,
            "marker": os.path.join(local_out, ".fault-injected"),
        }
    worker_config = {
        "sae": sae_cfg.to_dict(),
        "train": train_cfg.to_dict(),
        "threads_per_worker": max(1, int(job.parallel.cpus_per_worker)),
        "use_gpu": job.parallel.use_gpu,
        "storage_retry_s": job.storage.retry_s,
        "checkpoint_in_background": background,
        "cache": {
            "url": cache_url,
            "options": cache.storage_options if cache else None,
            "dtype": manifest.dtype,
            "init_shard": train_shards[0] if train_shards else None,
        },
        "stream": source
        and {
            "lm": dataclasses.asdict(source.lm),
            "model_stream": source.stream,
            "actors": job.data.lm_actors,
            "actor_cpus": job.data.lm_actor_cpus,
            "write": dataclasses.asdict(source.write) if source.write else None,
            "fault": fault and {"block": fault["lm_actor_block"], "marker": fault["marker"] + "-lm-actor"},
            "init_sample": source.init_sample,  # into the object store once (`ray_train.launch`)
        },
        "data": vars(data),
        "seed": job.train.seed,
        "shuffle_buffer_rows": job.data.shuffle_buffer_rows,
        "prefetch_batches": job.data.prefetch_batches,
        "logging": {"jsonl": os.path.join(local_out, "metrics.jsonl"), "wandb": wandb},
        "fault": fault,
        "elastic_check_s": job.ray.elastic_check_s,
        "record_rows_dir": record,
    }
    # the Ray Train run name keys the checkpoints: another config never resumes this run's
    spec = LaunchSpec(
        cache_remedy=rebuild_hint(cache_url, manifest.build_config, job.data.endpoint_url) if cache else "",
        planned_bytes=plan.total,
        run_name=job.run_id,
        storage_url=storage.absolute(job.storage.url),
        storage_options=storage.endpoint_options(job.storage.endpoint_url),
        workers=dims.world_size,
        tp=dims.tp,
        cpus_per_worker=job.parallel.cpus_per_worker,
        use_gpu=job.parallel.use_gpu,
        max_failures=job.ray.max_failures,
        worker_config=worker_config,
        layouts=layouts,
        elastic=job.parallel.elastic,
        node_wait_s=job.ray.node_wait_s,
        # the reads, or every worker's LM actors (GPUs when the cluster has them: a CPU share then)
        data_cpus=dims.world_size * job.data.lm_actors * job.data.lm_actor_cpus if source else DATA_CPUS,
    )
    what = (
        f"model stream {manifest.model} {manifest.hook}.{manifest.layer}: {data.rows} rows"
        if source
        else f"cache {storage.redact(job.data.cache)}: {manifest.n_rows} rows of {manifest.model} "
        f"{manifest.hook}.{manifest.layer}; training on {len(train_shards)} shards ({data.rows} rows)"
    )
    print0(
        f"{what} in {data.streams} streams, "
        f"{total_steps} steps of {job.train.batch_size} over dp={dims.dp} x tp={dims.tp} workers"
    )
    rule = "set" if train_cfg.lr is not None else f"the {train_cfg.lr_rule} rule for {train_cfg.budget_tokens} tokens"
    if train_cfg.lr is None and train_cfg.lr_scale != 1.0:
        rule += f" x {train_cfg.lr_scale:g}"
    print0(f"lr {train_cfg.resolved_lr(sae_cfg.n_latents):.3g} ({rule})")
    # output_dir shares storage.url's endpoint (the driver writes both)
    options = storage.endpoint_options(job.storage.endpoint_url) if storage.is_remote(out) else None
    return PreparedRun(spec, heldout, heldout_shards, manifest, source, sae_cfg, train_cfg, out, options)


def node_lost_line(lost, job: TrainJobConfig, spec: LaunchSpec) -> str:
    """The run's one line when nodes stayed gone: what is missing, and the command that resumes
    the run (the same run_id: the layout is not part of it) on the layout that fits."""
    line = f"{first_line(lost)}. Checkpoints registered so far are intact"
    fitting = lost.fitting
    if fitting is None:
        return line + ": rerun the same command once the cluster has the nodes back"
    streams = spec.worker_config["data"]["streams"]
    replaced = ("parallel.workers=", "parallel.tp=", "data.streams=", "parallel.min_workers=")
    keep = [storage.redact(a) for a in job_overrides() if not a.startswith(replaced)]
    args = [*keep, f"parallel.workers={fitting.workers}", f"parallel.tp={fitting.tp}", f"data.streams={streams}"]
    hidden = " (credentials in URLs shown as ***: put them back)" if any("***" in a for a in keep) else ""
    return (
        line + f"; resume it on {fitting} with: python jobs/train.py {' '.join(shlex.quote(a) for a in args)}{hidden}"
    )


def job_overrides() -> list[str]:
    """The command line's Hydra overrides (empty outside a Hydra job)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not run through Hydra
        return []


def smaller_layouts(job: TrainJobConfig, streams: int, plan_for) -> list[Layout]:
    """The layouts below the configured one that share the streams and that the memory planner
    accepts, largest first (elastic: down to parallel.min_workers), each with its micro-batches."""
    low = job.parallel.min_workers if job.parallel.elastic else 1
    out = []
    for layout in candidate_layouts(streams, job.parallel.workers, job.parallel.tp, low)[1:]:
        try:
            plan = plan_for(layout)
        except PlanError:
            continue
        if plan.fits:
            out.append(dataclasses.replace(layout, micro_batches=plan.micro_batches))
    return out


def export_and_evaluate(job: TrainJobConfig, run: PreparedRun, meta: dict[str, Any], sae_url: str) -> dict[str, Any]:
    """The exports asked for (streamed from the gathered SAE, whatever its size), then, with
    export.evaluate, the held-out metrics (which load the whole SAE into the driver's memory)."""
    from saescale.evaluation.reconstruction import reconstruction_metrics
    from saescale.formats.export import export_saelens, export_sparsify
    from saescale.formats.saved import load_sae

    out, options = run.output_dir, run.output_options
    peer_meta = {k: v for k, v in meta.items() if k != "cache"}  # what the peer formats describe
    if job.export.saelens:
        export_saelens(sae_url, storage.join(out, "export", "saelens"), peer_meta, options)
    if job.export.sparsify:
        export_sparsify(sae_url, storage.join(out, "export", "sparsify"), options)
    if not job.export.evaluate:
        return {}
    sae, _ = load_sae(sae_url, storage_options=options)
    heldout = torch.cat([run.heldout.read_shard(s) for s in run.heldout_shards])[: job.data.heldout_tokens]
    with torch.no_grad():
        metrics = reconstruction_metrics(sae, heldout, with_density=False)
        out = {
            "heldout_nmse": metrics.nmse,
            "heldout_l0": metrics.l0,
            "heldout_dead_fraction": metrics.dead_fraction,  # never fired on the held-out rows
            "heldout_tokens": metrics.tokens,
        }
        if sae.activation.has_threshold:  # BatchTopK's inference threshold, as exported
            out["threshold"] = float(sae.threshold)
        if job.export.test_time_k:
            out["nmse_at_k"] = {
                str(k): reconstruction_metrics(sae, heldout, k=k, with_density=False).nmse
                for k in job.export.test_time_k
            }
    return out


def run_train(cfg: DictConfig) -> dict[str, Any]:
    """The whole job; bad input exits 2 with one line, a failed run 1 (see `app.errors`)."""
    from saescale.app.errors import USER_ERRORS

    try:
        job = typed(cfg)
        run = prepare(cfg, job)
    except USER_ERRORS as exc:
        fail(exc)
    print0(f"run {job.run_id} -> {storage.redact(run.output_dir)}")

    from saescale.service.capacity import NodeLost
    from saescale.service.failures import RestartsExhausted, StorageUnavailable
    from saescale.service.ray_local import ensure_ray
    from saescale.service.ray_train import (
        ControllerStartFailed,
        RunFailed,
        checkpoint_url,
        fit_to_running_cluster,
        launch,
    )
    from saescale.service.stream import corrupt_shard_line
    from saescale.train.checkpoint import export_gathered

    spec, manifest = run.spec, run.manifest
    started = time.time()
    ensure_ray(job.ray.address, num_cpus=int(spec.workers * spec.cpus_per_worker + spec.data_cpus) + 1)
    try:  # a joined cluster may be too small for the workers and the reads: fit or refuse, never hang
        spec = fit_to_running_cluster(spec)
    except USER_ERRORS as exc:
        fail(exc)
    try:
        result = launch(spec)
    except RunFailed as failed:
        cause = failed.cause
        if isinstance(cause, CorruptShardError):  # bad input, not a crash: the remedy, no restarts spent
            cache_url = spec.worker_config["cache"]["url"]
            fail(corrupt_shard_line(cause, cache_url, spec.cache_remedy))
        if isinstance(cause, StorageUnavailable):  # not the user's input: exit 1, the checkpoint kept
            fail(first_line(cause), EXIT_FAILED)
        if isinstance(cause, ControllerStartFailed):  # e.g. no storage credentials on the nodes
            fail(first_line(cause), EXIT_FAILED)
        if isinstance(cause, NodeLost):  # nodes gone for ray.node_wait_s: the way on, on what is left
            fail(node_lost_line(cause, job, run.spec), EXIT_FAILED)
        if isinstance(cause, RestartsExhausted):  # crashes past ray.max_failures
            fail(crash_line(str(cause), job.ray.max_failures, spec.planned_bytes), EXIT_FAILED)
        if cause is not None:  # a refused resume, a bad batch or loss: the user's to fix
            fail(first_line(cause))
        fail(crash_line(str(failed), job.ray.max_failures, spec.planned_bytes), EXIT_FAILED)
    final = dict(result.metrics or {})
    ckpt = checkpoint_url(result, spec.storage_url)
    sae_url = storage.join(run.output_dir, "sae")
    meta = {
        "model_name": manifest.model,
        "hook_name": f"{manifest.hook}.{manifest.layer}",
        "context_size": manifest.context_length,
        "corpus": manifest.corpus,
        "cache": storage.redact(job.data.cache) if run.source is None else None,
    }
    try:  # the storage may have gone away, or a held-out shard be damaged: one line, not a traceback
        export_gathered(ckpt, sae_url, meta, spec.storage_options)
    except USER_ERRORS as exc:
        fail(exc)
    tokens = final.get("tokens") or 0
    sae_cfg = run.sae_cfg
    # config_hash marks which config finished here: a sweep skips the run only when it matches
    summary = {
        "run_name": job.run_name,
        "run_id": job.run_id,
        "config_hash": config_hash(cfg),
        "steps": final.get("step"),
        "tokens": final.get("tokens"),
        "n_latents": sae_cfg.n_latents,
        "k": sae_cfg.k,
        "dp": spec.workers // spec.tp,  # as configured; `layouts`: the ones it ran on, from which step
        "tp": spec.tp,
        "layouts": final.get("layouts"),
        "model": manifest.model,
        "hook": f"{manifest.hook}.{manifest.layer}",
        "d_in": sae_cfg.d_in,
        "compute": FLOPS_PER_TOKEN_DN * tokens * sae_cfg.d_in * sae_cfg.n_latents,
        "tokens_to_convergence": final.get("tokens_to_convergence"),
        "train_wall_s": round(time.time() - started, 1),
        "dead_fraction": final.get("dead_fraction"),
        "train_fvu": final.get("fvu"),
        "data_wait_frac": final.get("data_wait_frac"),
        "comm_bytes_per_step": final.get("comm_bytes_per_step"),
        "time_split_s": {k: final.get(f"total_{k}_s") for k in ("data_wait", "compute", "comm")},
        "startup_wait_s": final.get("startup_wait_s"),
        "checkpoint_stall_s": final.get("checkpoint_stall_s"),  # this attempt's periodic checkpoints
        "steps_this_attempt": final.get("steps_this_attempt"),  # the steps time_split_s covers
        "checkpoint_every": final.get("checkpoint_every") or job.train.checkpoint_every,
        "peak_rss_mb_rank0": final.get("peak_rss_mb_rank0"),
        "planned_mb_per_rank": round(spec.planned_bytes / 2**20, 1),
        "checkpoint": storage.redact(ckpt),
        # what a report needs to tell runs apart without the Hydra config (e.g. jobs/paper.py)
        "cache": storage.redact(job.data.cache) if run.source is None else None,
        "source": job.data.source,
        "heldout": (
            run.source.describe_heldout()
            if run.source
            else {"cache": storage.redact(job.data.cache), "shards": run.heldout_shards}
        ),
        "lr": run.train_cfg.resolved_lr(sae_cfg.n_latents),
        "sae": sae_cfg.to_dict(),
        "train": {**run.train_cfg.to_dict(), "epochs": job.train.epochs, "batch_size": job.train.batch_size},
    }

    try:
        summary.update(export_and_evaluate(job, run, meta, sae_url))
    except USER_ERRORS as exc:
        fail(exc)
    metrics = spec.worker_config["logging"]["jsonl"]
    try:  # storage may be gone by now: one line, not a traceback
        if storage.is_remote(run.output_dir) and os.path.exists(metrics):  # the remote output holds them too
            storage.write_file_atomic(
                storage.join(run.output_dir, "metrics.jsonl"), lambda p: shutil.copyfile(metrics, p), run.output_options
            )
        storage.write_json_atomic(storage.join(run.output_dir, "result.json"), summary, run.output_options)
    except USER_ERRORS as exc:
        fail(exc)
    if run.source is not None and run.source.write is not None:  # after result.json: the run is done
        try:
            finish_model_source(run.source)
            summary["cache_written"] = storage.redact(run.source.write.output)
            storage.write_json_atomic(storage.join(run.output_dir, "result.json"), summary, run.output_options)
        except USER_ERRORS as exc:
            fail(f"the run finished (result.json written); its data.cache_write did not: {first_line(exc)}")
    print0(json.dumps(summary))
    return summary
