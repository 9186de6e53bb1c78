"""The training service on Ray: cached activation shards streamed by Ray Data into a Ray Train
`TorchTrainer` whose workers run the (dp x tp) per-rank loop of `saescale.distributed.rank`.

Data: one Ray Dataset, `read_parquet` over the cache's training shards listed once per epoch,
each epoch in its own seeded shuffled order (one continuous stream: no pipeline restart and
start-up wait at epoch boundaries), split by Ray Train with `streaming_split(world, equal=True)`
(every rank gets the same number of rows), batched per rank with a seeded local shuffle buffer.
Execution keeps order (`preserve_order`), so the stream of every rank is a pure function of the
seed: a restarted run skips exactly the batches it already trained, the data position being the
step.

Checkpoints: every `checkpoint_every` steps each rank writes its shard to a local folder and
calls `ray.train.report`; Ray uploads the folders to `RunConfig.storage_path/<run name>` and
registers the checkpoint only once every rank reported. A restarted worker group (after a
failure, `FailureConfig(max_failures)`) or a relaunched driver with the same run name resumes
from the latest registered checkpoint.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from saescale.data.reader import ActivationCache
from saescale.core.config import SAEConfig, TrainConfig
from saescale.distributed.rank import RankLoop, build_rank_trainer, print0
from saescale.train.loggers import ConsoleLogger, JsonlLogger, MultiLogger, WandbLogger
from saescale.distributed.mesh import ParallelDims
from saescale.sweeps.scaling import tokens_to_convergence
from saescale.train.sharded_checkpoint import META, load_rank_shard, save_rank_shard, shard_name

ACT_COLUMN = "act"
ROW_ID_COLUMNS = ["window", "pos"]


@dataclass
class DataPlan:
    """What every rank reads: the files of all epochs in order, and how many batches of what size."""

    files: list[str]  # training shard paths inside the filesystem, one epoch's worth
    rows: int  # rows of one epoch
    per_rank_batch: int
    total_steps: int
    epochs: int
    seed: int


def plan_data(rows: int, files: list[str], batch_size: int, world: int, epochs: int, seed: int) -> DataPlan:
    per_rank = batch_size // world
    steps = (rows * epochs // world) // per_rank  # equal=True gives each rank floor(rows / world) rows
    if steps == 0:
        raise ValueError(f"train.batch_size={batch_size} is larger than the {rows * epochs} training rows")
    return DataPlan(files, rows, per_rank, steps, epochs, seed)


def epoch_files(files: list[str], seed: int, epoch: int) -> list[str]:
    """The shuffled file order of one epoch (a pure function of seed and epoch)."""
    return [files[i] for i in np.random.default_rng([seed, epoch]).permutation(len(files))]


def make_collate(dtype: str, d_model: int, with_ids: bool):
    """Zero-copy Arrow -> torch for the fixed_size_binary activation column (the default collate
    cannot read binary columns); with ids, also each row's (window, pos) as one int64."""
    from ray.data.collate_fn import ArrowBatchCollateFn

    from saescale.data.format import activations_from_column

    class ActivationCollate(ArrowBatchCollateFn):
        def __call__(self, batch):  # batch: pyarrow.Table
            # kept in the cache dtype: the TP all-gather moves half the bytes; the trainer upcasts
            acts = activations_from_column(batch.column(ACT_COLUMN), dtype, d_model)
            if not with_ids:
                return acts
            window = torch.from_numpy(batch.column("window").to_numpy().astype(np.int64))
            pos = torch.from_numpy(batch.column("pos").to_numpy().astype(np.int64))
            return acts, window * 65536 + pos

    return ActivationCollate()


def make_datasets(plan: DataPlan, filesystem, with_ids: bool) -> dict[str, Any]:
    import ray.data

    columns = [ACT_COLUMN] + (ROW_ID_COLUMNS if with_ids else [])
    # one read per epoch, concatenated (a path listed twice in one read_parquet is read once by
    # Ray's Parquet reader); one read task per shard, so the first batch waits for one shard
    epochs = [ray.data.read_parquet(epoch_files(plan.files, plan.seed, e), filesystem=filesystem, shuffle=None,
                                    override_num_blocks=len(plan.files)).select_columns(columns)
              for e in range(plan.epochs)]
    return {"train": epochs[0].union(*epochs[1:]) if len(epochs) > 1 else epochs[0]}


# ------------------------------------------------------------------ inside each Ray Train worker
def fetch_rank_files(checkpoint, directory: str, shard: str) -> None:
    """Download only meta.json and this rank's two files of a checkpoint (not every rank's
    shards, as `Checkpoint.as_directory` would: terabytes at 16M latents)."""
    import pyarrow.fs as pafs

    for name in (META, f"{shard}.sae.safetensors", f"{shard}.state.safetensors"):
        pafs.copy_files(f"{checkpoint.path}/{name}", os.path.join(directory, name),
                        source_filesystem=checkpoint.filesystem, destination_filesystem=pafs.LocalFileSystem())


def _rank0_logger(config: dict[str, Any], start_step: int):
    log = config["logging"]
    loggers: list = [ConsoleLogger(config["train"]["total_steps"], initial_step=start_step)]
    if log.get("jsonl"):
        loggers.append(JsonlLogger(log["jsonl"]))
    if log.get("wandb"):
        loggers.append(WandbLogger(**log["wandb"]))
    return MultiLogger(*loggers)


def _maybe_fail(config: dict[str, Any], rank: int, step: int, during_save: bool) -> None:
    """Test hook (`fault.*`): SIGKILL this worker once, at a step, optionally inside a save."""
    fault = config.get("fault") or {}
    if fault.get("rank") != rank or fault.get("step") != step or bool(fault.get("during_save")) != during_save:
        return
    marker = fault["marker"]
    if os.path.exists(marker):
        return  # already failed once: the restarted run goes through
    with open(marker, "w") as handle:
        handle.write(str(step))
    os.kill(os.getpid(), signal.SIGKILL)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads_per_worker"])
    dims = ParallelDims.from_world(world, config["tp"])
    sae_cfg, train_cfg = SAEConfig.from_dict(config["sae"]), TrainConfig.from_dict(config["train"])
    device = "cuda" if config.get("use_gpu") else "cpu"
    trainer, tp, dp = build_rank_trainer(sae_cfg, train_cfg, dims, rank, None, device)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with tempfile.TemporaryDirectory(prefix="saescale-resume-") as directory:
            fetch_rank_files(checkpoint, directory, shard_name(dims.coords(rank)[1], dims.tp))
            meta = load_rank_shard(directory, trainer, dims, rank)
        saved = meta.get("data", {})
        stream = {"world": world, "per_rank_batch": DataPlan(**config["data"]).per_rank_batch, "seed": config["seed"]}
        if any(k in saved and saved[k] != v for k, v in stream.items()):
            raise ValueError(f"the checkpoint's data stream was {saved}, this run's is {stream}: resuming would "
                             "retrain or skip rows; resume with the same workers, batch_size and seed")
        if rank == 0:
            print(f"[saescale] resumed from the step-{trainer.step} checkpoint ({trainer.tokens_seen} tokens)", flush=True)
    else:
        cache = ActivationCache(config["cache"]["url"], config["cache"]["options"])
        sample = cache.read_shard(config["cache"]["init_shard"])[: train_cfg.geometric_median_samples]
        trainer.initialize(sample)
    if rank == 0:
        trainer.logger = _rank0_logger(config, trainer.step)
    data = DataPlan(**config["data"])
    record = config.get("record_rows_dir")
    loop = RankLoop(trainer, tp, dp, config["checkpoint_every"])

    def local_batches():
        collate = make_collate(config["cache"]["dtype"], sae_cfg.d_in, with_ids=bool(record))
        skip, step = trainer.step, trainer.step
        batches = ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=data.per_rank_batch, collate_fn=collate, drop_last=True,
            local_shuffle_buffer_size=config["shuffle_buffer_rows"] or None,
            local_shuffle_seed=config["seed"], prefetch_batches=config["prefetch_batches"])
        for i, batch in enumerate(batches):
            if i < skip:
                continue  # trained before the checkpoint we resumed from
            step += 1
            if record:
                batch, ids = batch
                with open(os.path.join(record, f"rows_rank{rank}.jsonl"), "a") as handle:
                    handle.write(json.dumps({"step": step, "ids": ids.tolist()}) + "\n")
            yield batch

    def report(step: int, final: bool = False) -> None:
        metrics = {"step": step, "tokens": trainer.tokens_seen, "final": final}
        if loop.history:  # the last logged step's (global) values
            metrics.update({k: v for k, v in loop.history[-1].items() if k in ("loss", "fvu", "l0", "dead_fraction")})
        if final:
            t = loop.totals
            wall = t.data_wait + t.compute + t.comm
            metrics.update({"total_data_wait_s": t.data_wait, "total_compute_s": t.compute, "total_comm_s": t.comm,
                            "startup_wait_s": t.startup_wait,
                            "peak_rss_mb_rank0": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                            "data_wait_frac": t.data_wait / max(wall, 1e-9),
                            "comm_bytes_per_step": t.comm_bytes / max(t.steps, 1), "steps_this_attempt": t.steps})
            curve = [(h["step"], h["fvu"]) for h in loop.history if "fvu" in h]
            if curve and step:  # this attempt's curve only (a resumed run's earlier steps are not kept)
                per_step = trainer.tokens_seen / step
                metrics["tokens_to_convergence"] = tokens_to_convergence([s * per_step for s, _ in curve],
                                                                         [f for _, f in curve])
        with tempfile.TemporaryDirectory(prefix="saescale-ckpt-") as directory:
            save_rank_shard(directory, trainer, dims, rank, sae_cfg, extra={
                "data": {"batches_consumed_per_rank": step, "per_rank_batch": data.per_rank_batch,
                         "seed": config["seed"], "world": world}})
            _maybe_fail(config, rank, step, during_save=True)
            has_files = bool(os.listdir(directory))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if has_files else None)

    max_steps = train_cfg.total_steps or data.total_steps
    end = loop.run(local_batches(), max_steps, on_checkpoint=lambda s: report(s) if s < max_steps else None,
                   on_step=lambda s: _maybe_fail(config, rank, s, during_save=False))
    report(end, final=True)  # the last checkpoint, with the run's time split
    trainer.logger.close()


# ------------------------------------------------------------------------------- the driver
def arrow_filesystem(url: str, storage_options: dict[str, Any] | None):
    """(pyarrow filesystem, path inside it) for any fsspec URL: local paths use pyarrow's own
    local filesystem, anything else goes through fsspec (s3fs honours endpoint_url options)."""
    import pyarrow.fs as pafs
    from fsspec.implementations.local import LocalFileSystem

    from saescale import storage

    fs, path = storage.url_to_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


@dataclass
class LaunchSpec:
    """Everything the driver needs to start (or resume) one training run on Ray."""

    run_name: str
    storage_url: str  # Ray Train storage root: checkpoints go to <storage_url>/<run_name>/
    storage_options: dict[str, Any] | None
    workers: int
    tp: int
    cpus_per_worker: float
    use_gpu: bool
    max_failures: int
    worker_config: dict[str, Any]  # train_loop_per_worker's config
    planned_bytes: int = 0  # the memory planner's per-worker total, for the report


def launch(spec: LaunchSpec):
    """Run the TorchTrainer to completion; returns Ray's Result (its checkpoint is the last one)."""
    import ray.data
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic streams: exact resume
    ctx.enable_progress_bars = False  # rank 0's step progress bar is the one to watch
    cache = spec.worker_config["cache"]
    filesystem, _ = arrow_filesystem(cache["url"], cache["options"])
    datasets = make_datasets(DataPlan(**spec.worker_config["data"]), filesystem,
                             with_ids=bool(spec.worker_config.get("record_rows_dir")))
    storage_fs, storage_path = arrow_filesystem(spec.storage_url, spec.storage_options)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=spec.worker_config,
        scaling_config=ray.train.ScalingConfig(num_workers=spec.workers, use_gpu=spec.use_gpu,
                                               resources_per_worker={"CPU": spec.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=spec.run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(execution_options=ExecutionOptions(preserve_order=True),
                                            enable_shard_locality=False),
    )
    return trainer.fit()


def checkpoint_url(result, storage_url: str) -> str:
    """An fsspec URL for the Result's checkpoint folder (Ray gives a path inside its filesystem)."""
    path = result.checkpoint.path
    if "://" in storage_url and not storage_url.startswith("file://"):
        return f"{storage_url.split('://', 1)[0]}://{path}"
    return path
