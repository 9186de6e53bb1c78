"""The training service on Ray: cached activation shards streamed by Ray Data into a Ray Train
`TorchTrainer` whose workers run the (dp x tp) one training loop (`saescale.train.trainer.Trainer.fit`).

Data: `data.streams` canonical streams (`saescale.service.stream`: every shard checksummed as it
is read); each rank builds the Ray Datasets of the streams it owns (a contiguous run of them),
reads them in blocks of `data.shuffle_buffer_rows` rows, each block's rows permuted by a seed of
(run seed, stream, block) (`data.blocks`), and concatenates one batch of each stream into its share
of the step. Execution keeps order (`preserve_order`), so every stream is a pure function of the
seed and the data position is the step, on any worker layout: a restarted run starts its streams
at the block holding its checkpoint's step and drops the steps before it in that block.

Checkpoints: every `checkpoint_every` steps (or at the Young/Daly interval: `train.cadence`)
each rank copies its shard aside and calls `ray.train.report`; Ray uploads the files to
`RunConfig.storage_path/<run name>` (in the background unless storage.checkpoint_in_background
is off) and registers the checkpoint only once every rank's upload finished. A restarted worker group (after a
failure, `FailureConfig(max_failures)`) or a relaunched driver with the same run name resumes
from the latest registered checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from saescale import retry, storage
from saescale.console import print0
from saescale.core.config import SAEConfig, TrainConfig
from saescale.data.blocks import block_steps, resume_block
from saescale.data.reader import ActivationCache
from saescale.distributed.layouts import Layout
from saescale.service import preemption
from saescale.service.capacity import CapacityCheck, GrowWatch, capacity_gate
from saescale.service.failures import REPORTED, failure_policy, first_cause, stopped_by_storage, storage_fault
from saescale.service.lm_actors import actor_gpus, rank_dataset
from saescale.service.preemption import Preempted
from saescale.service.stream import (
    DataPlan,
    arrow_filesystem,
    make_collate,
    make_datasets,
    owned_streams,
    prefetch_blocks,
    set_retry_budget,
    stream_name,
    stream_steps,
)
from saescale.train.checkpoint import META, Fetch, RankFiles, copy_aside, load_rank_shard
from saescale.train.convergence import tokens_to_convergence
from saescale.train.loggers import ConsoleLogger, JsonlLogger, MultiLogger, WandbLogger
from saescale.train.rank_setup import build_rank_trainer
from saescale.train.trainer import EPS, Trainer


# ------------------------------------------------------------------ inside each Ray Train worker
def checkpoint_fetcher(checkpoint, directory: str) -> Fetch:
    """Fetch files of a registered Ray checkpoint on demand into `directory`: a rank downloads
    meta.json and the shards its latent rows come from, not every rank's files (as
    `Checkpoint.as_directory` would: terabytes at 16M latents)."""
    import pyarrow.fs as pafs

    def fetch(name: str) -> str:
        local = os.path.join(directory, name)
        if not os.path.exists(local):
            pafs.copy_files(
                f"{checkpoint.path}/{name}",
                local,
                source_filesystem=checkpoint.filesystem,
                destination_filesystem=pafs.LocalFileSystem(),
            )
        return local

    return fetch


def check_data_position(saved: dict[str, Any], data: DataPlan, seed: int, steps_per_block: int, cached: bool) -> None:
    """The data position is the step: resuming needs the same streams, global batch, seed and
    shuffle blocks. The layout may change freely (every layout reads the same rows per step:
    `stream.DataPlan`). `cached`: the run reads a cache (whose streams were shuffled otherwise
    before the blocks; the model stream always had them)."""
    if not saved:
        return
    if cached and "block_steps" not in saved:
        raise ValueError(
            "the checkpoint was written before the cache's streams were shuffled in blocks (data.shuffle_buffer_rows): "
            "its rows came in another order, so resuming would retrain or skip rows; start a new run (another run_id)"
        )
    if saved.get("block_steps", steps_per_block) != steps_per_block:
        raise ValueError(
            f"the checkpoint's data stream was shuffled in blocks of {saved['block_steps']} steps; this run's "
            f"are {steps_per_block} steps: resuming would retrain or skip rows; resume with the same "
            "data.shuffle_buffer_rows"
        )
    if "streams" not in saved and saved.get("world", 1) != 1:
        raise ValueError(
            f"the checkpoint was written by a {saved['world']}-worker run from before data.streams: its rows were "
            "split another way, so resuming would retrain or skip rows; start a new run (another run_id)"
        )
    streams = saved.get("streams", 1)  # a one-worker run from before data.streams read one stream
    batch = saved.get("stream_batch", saved.get("per_rank_batch", 0)) * streams
    if (streams, batch, saved["seed"]) != (data.streams, data.global_batch, seed):
        raise ValueError(
            f"the checkpoint's data stream had data.streams={streams}, global batch {batch} and seed "
            f"{saved['seed']}; this run's has {data.streams}, {data.global_batch} and {seed}: resuming would "
            "retrain or skip rows; resume with the same data.streams, train.batch_size and train.seed"
        )


def _put_file(fs, source: str, target: str) -> None:
    """Stream a local file into a pyarrow filesystem; closing the stream raises if it failed."""
    with open(source, "rb") as src, fs.open_output_stream(target) as out:
        shutil.copyfileobj(src, out, 8 * 2**20)


class RayReportCheckpointer:
    """Checkpoints through `ray.train.report`: Ray uploads each rank's files to the run's storage
    and registers the checkpoint once every rank's upload finished, so a crash mid-save (or
    mid-upload) leaves the previous checkpoint as the latest. The report carries the run's
    metrics (the final one, its time split and tokens to convergence).

    In the background (`background=True`, `storage.checkpoint_in_background`): the state is copied
    into host memory at the step boundary, and Ray's upload thread writes it to storage while
    training goes on (`CheckpointUploadMode.ASYNC`); at most one checkpoint is in flight (the
    next save first waits for the previous upload). The final save is synchronous: the run ends
    with its last checkpoint registered."""

    def __init__(self, config: dict[str, Any], rank: int, data: DataPlan, world: int, background: bool = True) -> None:
        self.config, self.rank, self.data, self.world, self.background = config, rank, data, world, background
        self._in_flight: threading.Event | None = None
        self.layouts: list[dict[str, Any]] = []  # the run's layouts so far (`record_layout`)

    def metrics(self, trainer: Trainer, final: bool) -> dict[str, Any]:
        summary, step = trainer.summary, trainer.step
        metrics: dict[str, Any] = {"step": step, "tokens": trainer.tokens_seen, "final": final}
        if summary.history:  # the last logged step's (global) values
            metrics.update(
                {k: v for k, v in summary.history[-1].items() if k in ("loss", "fvu", "l0", "dead_fraction")}
            )
        if not final:
            return metrics
        metrics["layouts"] = self.layouts
        t = summary.totals
        wall = t.data_wait + t.compute + t.comm
        metrics.update(
            {
                "total_data_wait_s": t.data_wait,
                "total_compute_s": t.compute,
                "total_comm_s": t.comm,
                "startup_wait_s": t.startup_wait,
                "peak_rss_mb_rank0": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "data_wait_frac": t.data_wait / max(wall, EPS),
                "comm_bytes_per_step": t.comm_bytes / max(t.steps, 1),
                "steps_this_attempt": t.steps,
                "checkpoint_stall_s": summary.checkpoint_stall_s,
                "checkpoint_every": summary.checkpoint_every,
            }
        )
        curve = [(h["step"], h["fvu"]) for h in summary.history if "fvu" in h]
        if curve and step:  # this attempt's curve only (a resumed run's earlier steps are not kept)
            per_step = trainer.tokens_seen / step
            metrics["tokens_to_convergence"] = tokens_to_convergence(
                [s * per_step for s, _ in curve], [f for _, f in curve]
            )
        return metrics

    def writing(self) -> bool:
        """Whether a background upload is in flight (the cadence counts what it slows)."""
        return self._in_flight is not None and not self._in_flight.is_set()

    def save(self, trainer: Trainer, final: bool = False) -> None:
        import ray.train
        from ray.train import CheckpointUploadMode

        if self._in_flight is not None:
            self._in_flight.wait()  # at most one checkpoint in flight
        position = {
            "batches_consumed_per_stream": trainer.step,
            "streams": self.data.streams,
            "stream_batch": self.data.stream_batch,
            "seed": self.config["seed"],
            "world": self.world,
            "block_steps": block_steps(self.data.stream_batch, self.config.get("shuffle_buffer_rows", 0)),
        }
        background = self.background and not final
        copied = copy_aside(trainer, extra={"data": position, "layouts": self.layouts}, copy=background)
        done = self._in_flight = threading.Event()
        checkpoint = None
        if copied.files:  # Ray's handle on the upload: an empty folder (`upload` writes the copies)
            checkpoint = ray.train.Checkpoint.from_directory(tempfile.mkdtemp(prefix="saescale-ckpt-"))
        else:
            done.set()  # a DP replica other than 0: nothing to write, its report still counts
        storage_context = ray.train.get_context().get_storage()
        step = trainer.step  # the trainer moves on while a background upload runs

        def upload(handle, checkpoint_dir_name: str):
            try:
                _maybe_fail(self.config, self.rank, step, during_save=True)
                return upload_rank_files(copied, storage_context, checkpoint_dir_name)
            finally:
                shutil.rmtree(handle.path, ignore_errors=True)
                done.set()

        ray.train.report(
            self.metrics(trainer, final),
            checkpoint=checkpoint,
            checkpoint_upload_mode=CheckpointUploadMode.ASYNC if background else CheckpointUploadMode.SYNC,
            delete_local_checkpoint_after_upload=False,  # `upload` removes its folder itself
            checkpoint_upload_fn=upload,
        )


def upload_rank_files(copied: RankFiles, storage_context, checkpoint_dir_name: str):
    """Ray Train's checkpoint upload, replaced: this rank's files (copied aside at the step) go to
    the checkpoint's place in the run's storage (Ray's storage context gives the path and
    filesystem), meta.json last, and a file that cannot be written raises. The storage
    filesystem (`stream.arrow_filesystem`) already retries through storage faults: creating the
    folder, and each file's upload when its stream closes. Ray's default (pyarrow's
    `copy_files`) returns without error when writing a file to an fsspec filesystem fails
    (measured through the fault proxy), which would register a checkpoint with files missing."""
    import ray.train
    from safetensors.torch import save_file

    fs = storage_context.storage_filesystem
    destination = storage_context.build_checkpoint_path_from_name(checkpoint_dir_name)
    fs.create_dir(destination)
    with tempfile.TemporaryDirectory(prefix="saescale-upload-") as tmp:
        local = os.path.join(tmp, "file")
        for name, tensors in copied.files.items():
            save_file(tensors, local)
            _put_file(fs, local, f"{destination}/{name}")
            os.remove(local)
        if copied.meta is not None:
            with open(local, "w") as handle:
                json.dump(copied.meta, handle)
            _put_file(fs, local, f"{destination}/{META}")
    return ray.train.Checkpoint(path=destination, filesystem=fs)


def _rank0_logger(config: dict[str, Any], start_step: int) -> MultiLogger:
    log = config["logging"]
    loggers: list = [ConsoleLogger(config["train"]["total_steps"], initial_step=start_step)]
    if log.get("jsonl"):
        loggers.append(JsonlLogger(log["jsonl"]))
    if log.get("wandb"):
        loggers.append(WandbLogger(**log["wandb"]))
    return MultiLogger(*loggers)


def _maybe_fail(config: dict[str, Any], rank: int, step: int, during_save: bool) -> None:
    """Test hook (`fault.*`): SIGKILL this worker once, at a step, optionally inside a save
    (`fault.signal=term`: a SIGTERM, i.e. a preemption notice)."""
    fault = config.get("fault") or {}
    if rank == 0 and not during_save and step in fault.get("hold_steps", ()):
        _hold(fault["hold_dir"], step)
    if fault.get("rank") != rank or fault.get("step") != step or bool(fault.get("during_save")) != during_save:
        return
    marker = fault["marker"]
    if os.path.exists(marker):
        return  # already failed once: the restarted run goes through
    with open(marker, "w") as handle:
        handle.write(str(step))
    os.kill(os.getpid(), signal.SIGTERM if fault.get("signal") == "term" else signal.SIGKILL)


def _hold(directory: str, step: int, timeout_s: float = 600.0) -> None:
    """Test hook (`fault.hold_steps`): pause once after `step` until the test writes release-<step>."""
    held, release = os.path.join(directory, f"held-{step}"), os.path.join(directory, f"release-{step}")
    if os.path.exists(held):
        return  # held once already (an earlier attempt)
    storage.write_bytes_atomic(held, str(os.getpid()).encode())  # the test reads it as soon as it exists
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.05)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: build this rank's trainer, resume or initialise it, and run the
    one training loop (`Trainer.fit`) over this rank's share of the Ray Data stream."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads_per_worker"])
    retry.set_budget(config.get("storage_retry_s"))
    set_retry_budget(ctx.get_storage().storage_filesystem, retry.budget_s())  # see `launch`
    layouts = [Layout(**layout) for layout in config["layouts"]]
    layout = next((lay for lay in layouts if lay.workers == world), None)
    if layout is None:
        raise RuntimeError(f"internal: Ray started {world} workers, not one of the run's layouts {layouts}")
    dims = layout.dims()
    sae_cfg, train_cfg = SAEConfig.from_dict(config["sae"]), TrainConfig.from_dict(config["train"])
    threads = shard_threads(layout, layouts[0], bool(config.get("elastic")))
    # shard threads: each thread is a rank of the configured layout, chunking its batch as that does
    train_cfg = replace(train_cfg, micro_batches=(layouts[0] if threads > 1 else layout).micro_batches)
    device = "cuda" if config.get("use_gpu") else "cpu"
    trainer = build_rank_trainer(sae_cfg, train_cfg, dims, rank, None, device, shard_threads=threads)

    data = DataPlan(**config["data"])
    checkpoint = ray.train.get_checkpoint()
    history: list[dict[str, Any]] = []
    if checkpoint is not None:
        set_retry_budget(checkpoint.filesystem, retry.budget_s())  # the controller's copy had 2x
        with tempfile.TemporaryDirectory(prefix="saescale-resume-") as directory:
            meta = load_rank_shard(checkpoint_fetcher(checkpoint, directory), trainer)
        check_data_position(
            meta.get("data", {}),
            data,
            config["seed"],
            block_steps(data.stream_batch, config["shuffle_buffer_rows"]),
            cached=not config.get("stream"),
        )
        history = list(meta.get("layouts", []))
        print0(
            f"resumed from the step-{trainer.step} checkpoint ({trainer.tokens_seen} tokens; written at "
            f"dp={meta['dp']} x tp={meta['tp']}, resuming at dp={dims.dp} x tp={dims.tp})"
        )
    elif config.get("stream"):  # the driver computed the first training rows
        trainer.initialize(ray.get(config["stream"]["init_sample"]).float())
    else:
        cache = ActivationCache(config["cache"]["url"], config["cache"]["options"])
        sample = cache.read_shard(config["cache"]["init_shard"])[: train_cfg.geometric_median_samples]
        trainer.initialize(sample)
    before = len(history)
    history = record_layout(history, layout, trainer.step, layouts[0], threads)
    if rank == 0:
        trainer.logger = _rank0_logger(config, trainer.step)
        if len(history) > before:  # this start began a layout: the metrics log says so too
            trainer.logger.log({"layout": str(layout), "why": history[-1]["why"]}, trainer.step)
    record = config.get("record_rows_dir")
    total_steps = train_cfg.total_steps or data.total_steps

    def local_batches():
        """This rank's share of each global batch: the next batch of every stream it owns,
        concatenated in stream order, from the block that holds the resume step (`data.blocks`)."""
        collate = make_collate(config["cache"]["dtype"], sae_cfg.d_in, with_ids=bool(record))
        step = trainer.step
        owned = owned_streams(data.streams, world, rank)
        if config.get("stream"):  # computed from the resume step on: nothing to skip
            stream = config["stream"]
            dataset = rank_dataset(
                stream["lm"], stream["model_stream"], owned, trainer.step, stream["actors"],
                stream["actor_cpus"], stream["write"], total_steps, stream["fault"], stream["gpus"],
            )  # fmt: skip
            batches = dataset.iter_torch_batches(
                batch_size=data.stream_batch * len(owned),
                collate_fn=collate,
                drop_last=True,
                prefetch_batches=config["prefetch_batches"],
            )
            streams, skip = [batches], 0
        else:
            per_block = block_steps(data.stream_batch, config["shuffle_buffer_rows"])
            first_block, skip = resume_block(trainer.step, per_block)
            # whole blocks up to the run's end (`fit` stops at total_steps): a block is shuffled the
            # same whatever train.max_steps, so a run continued with a larger one reads the same rows
            whole_blocks = min(-(-total_steps // per_block) * per_block, data.total_steps)
            cache = config["cache"]
            filesystem, _ = arrow_filesystem(cache["url"], cache["options"])
            datasets = make_datasets(
                data, filesystem, bool(record), cache["url"], cache.get("remedy", ""), owned,
                start_row=first_block * per_block * data.stream_batch, stop_row=whole_blocks * data.stream_batch,
            )  # fmt: skip
            streams = [
                stream_steps(
                    datasets[stream_name(c)].iter_torch_batches(
                        batch_size=per_block * data.stream_batch,
                        collate_fn=collate,
                        prefetch_batches=prefetch_blocks(config["prefetch_batches"], per_block),
                    ),
                    config["seed"],
                    c,
                    first_block,
                    config["shuffle_buffer_rows"] > 0,
                    data.stream_batch,
                )  # fmt: skip
                for c in owned
            ]
        for i, parts in enumerate(zip(*streams)):
            if i < skip:
                continue  # trained before the checkpoint we resumed from (the start of its block)
            step += 1
            if record:
                ids = torch.cat([part[1] for part in parts])
                parts = [part[0] for part in parts]
                with open(os.path.join(record, f"rows_rank{rank}.jsonl"), "a") as handle:
                    handle.write(json.dumps({"step": step, "ids": ids.tolist()}) + "\n")
            yield parts[0] if len(parts) == 1 else torch.cat(parts)

    grow = None
    if rank == 0 and config.get("elastic") and world < layouts[0].workers:
        check = CapacityCheck(**config["capacity"])
        grow = GrowWatch(layouts, world, check, config["elastic_check_s"])

    def stop_requested() -> bool:
        return preemption.noticed() or (grow is not None and grow())

    checkpointer = RayReportCheckpointer(config, rank, data, world, config.get("checkpoint_in_background", True))
    checkpointer.layouts = history
    preemption.start_training()
    try:
        summary = trainer.fit(
            local_batches(),
            total_steps,
            checkpointer=checkpointer,
            on_step=lambda s: _maybe_fail(config, rank, s, during_save=False),
            stop_requested=stop_requested,
        )
    finally:
        preemption.stop_training()
    trainer.logger.close()
    if summary.preempted:  # the checkpoint of this step is registered: restart from it
        if preemption.noticed():
            raise Preempted(f"preempted at step {trainer.step}; its checkpoint is registered")
        raise Preempted(f"left at step {trainer.step} to grow back to a larger layout; its checkpoint is registered")


def shard_threads(layout: Layout, configured: Layout, elastic: bool) -> int:
    """How many TP ranks one worker runs as threads (`saescale.train.shard_threads`): an elastic run on one
    worker whose configured layout is pure TP runs that layout's ranks, so losing a node does not
    change what the run computes; otherwise 1 (each worker is one rank). Not when the planner
    gave the one-worker layout more micro-batches than the configured one: the threads chunk the
    batch as the configured ranks do, and would then hold more than the plan allows."""
    if (
        elastic
        and layout.workers == 1
        and configured.dp == 1
        and configured.tp > 1
        and layout.micro_batches <= configured.micro_batches
    ):
        return configured.tp
    return 1


def record_layout(
    history: list[dict[str, Any]], layout: Layout, step: int, configured: Layout, threads: int = 1
) -> list[dict[str, Any]]:
    """The run's layouts so far (kept in the checkpoint meta), with this start's appended when it
    differs from the last: from which step, and why (and `shard_threads` when its one worker runs
    the configured layout's TP ranks as threads: the same steps as the configured layout)."""
    last = history[-1] if history else None
    if last is not None and (last["workers"], last["tp"]) == (layout.workers, layout.tp):
        return history
    if last is None:
        why = (
            "start"
            if layout == configured
            else f"start: the cluster holds {layout.workers} of {configured.workers} workers"
        )
    elif layout.workers < last["workers"]:
        why = f"the cluster lost workers: it holds {layout.workers} of the {last['workers']}"
    else:
        why = f"resources returned: the cluster holds {layout.workers} workers again"
    entry = {"step": step, "workers": layout.workers, "dp": layout.dp, "tp": layout.tp, "why": why}
    if threads > 1:
        entry["shard_threads"] = threads
    runs = f", running the {threads} TP ranks of {configured} as threads" if threads > 1 else ""
    print0(f"layout from step {step}: {layout}{runs} ({why})")
    return [*history, entry]


# ------------------------------------------------------------------------------- the driver
# what Ray Data's read tasks request (Ray's default: one CPU per task). Ray Train's workers hold
# their CPUs for the whole run, so a cluster with no CPU left beside them never runs a read task:
# the job would wait forever ("Cluster resources are not enough to run any task ...")
DATA_CPUS = 1.0


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
    cache_remedy: str = ""  # how to rebuild the cache, in a corrupt shard's error (`stream.rebuild_hint`)
    planned_bytes: int = 0  # the memory planner's per-worker total, for the report
    # the layouts the run may take, largest (the configured one) first; one unless elastic
    layouts: list[Layout] = field(default_factory=list)
    elastic: bool = False
    node_wait_s: float = 300.0  # how long a start waits for the cluster to hold a layout (`capacity`)
    data_cpus: float = DATA_CPUS  # what the data pipeline needs beside the workers (reads, or LM actors)

    def __post_init__(self) -> None:
        if not self.layouts:
            self.layouts = [Layout(self.workers, self.tp, self.worker_config.get("train", {}).get("micro_batches", 1))]


MIN_WORKER_CPUS = 0.01  # the smallest share a worker may reserve when the cluster is short


class ClusterTooSmall(ValueError):
    """The cluster cannot hold the workers and one read task at once."""


def fit_to_cluster(spec: LaunchSpec, cluster_cpus: float) -> LaunchSpec:
    """The spec with its workers' CPU requests fitted beside the data pipeline's reads.

    Enough CPUs (workers x cpus_per_worker + DATA_CPUS): unchanged. Fewer, but more than the reads
    need (the README's `ray start --head` on a 2-core machine, 2 workers of 1 CPU): each worker
    asks for an equal share of what the reads leave, a logical request only (its torch threads
    stay `parallel.cpus_per_worker`, as the embedded Ray oversubscribes on purpose), and says so.
    Too few for a share of `MIN_WORKER_CPUS` each: `ClusterTooSmall`, naming the CPUs needed and found, before
    anything starts. A cluster with no CPU yet (an autoscaler's head started with --num-cpus=0)
    is left to its autoscaler."""
    data_cpus = spec.data_cpus
    need = spec.workers * spec.cpus_per_worker + data_cpus
    if cluster_cpus <= 0 or cluster_cpus >= need:
        return spec
    share = int((cluster_cpus - data_cpus) / spec.workers * 100) / 100  # floor: the sum must fit
    if share < MIN_WORKER_CPUS:
        raise ClusterTooSmall(
            f"the run needs {need:g} CPUs in the Ray cluster ({spec.workers} workers x "
            f"parallel.cpus_per_worker={spec.cpus_per_worker:g}, plus {data_cpus:g} for the data pipeline; "
            f"at the least {data_cpus + MIN_WORKER_CPUS * spec.workers:g}, the workers sharing the rest) and the cluster has "
            f"{cluster_cpus:g}: add a node with CPUs, or run without ray.address (an embedded local Ray)"
        )
    print0(
        f"the cluster has {cluster_cpus:g} CPUs, not the {need:g} that {spec.workers} workers x "
        f"parallel.cpus_per_worker={spec.cpus_per_worker:g} + {data_cpus:g} for the data pipeline ask for: each "
        f"worker reserves {share:g} CPU (its threads are unchanged), leaving {data_cpus:g} to the data pipeline"
    )
    return replace(spec, cpus_per_worker=share)


def fit_to_running_cluster(spec: LaunchSpec) -> LaunchSpec:
    """`fit_to_cluster` on the CPUs of the Ray this process is connected to."""
    import ray

    return fit_to_cluster(spec, ray.cluster_resources().get("CPU", 0))


class RunFailed(RuntimeError):
    """The Ray Train run failed after its restarts. `cause` is the error behind it when it is
    the user's to fix (a corrupt shard, a refused resume, a bad batch or non-finite loss) or
    storage that stayed silent (`failures.StorageUnavailable`), else None (a crash)."""

    def __init__(self, message: str, cause: BaseException | None) -> None:
        super().__init__(message)
        self.cause = cause


def launch(spec: LaunchSpec):
    """Run the TorchTrainer to completion; returns Ray's Result (its checkpoint is the last one).
    Raises `RunFailed` when the run fails."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    cache = spec.worker_config["cache"]
    storage_fs, storage_path = arrow_filesystem(spec.storage_url, spec.storage_options)
    # what a restart after a storage fault waits for: the run's storage (and the cache's)
    probes = [(storage_fs, storage_path, storage.redact(spec.storage_url))]
    if cache["url"] is not None:  # each rank reads the streams it owns (`train_loop_per_worker`)
        filesystem, cache_path = arrow_filesystem(cache["url"], cache["options"])
        probes.append((filesystem, f"{cache_path}/manifest.json", storage.redact(cache["url"])))  # no listing needed
    retry_s = spec.worker_config.get("storage_retry_s")
    retry_s = retry.budget_s() if retry_s is None else retry_s
    # Ray Train's controller writes its checkpoint registry through this filesystem, and a
    # failed write ends the run at once (no restart): it must outlast a worker's failed call
    # (storage.retry_s) plus the wait before the restart (as long again). The workers set it
    # back to storage.retry_s in their copy (`train_loop_per_worker`).
    set_retry_budget(storage_fs, 2 * retry_s, f"Ray Train's controller: 2 x storage.retry_s={retry_s:g}")
    stream = spec.worker_config.get("stream")
    if stream:  # one copy of the plan and the first rows in the object store, for every worker
        stream = {
            **stream,
            "init_sample": ray.put(stream["init_sample"]),
            "model_stream": ray.put(stream["model_stream"]),
            "gpus": actor_gpus(spec.workers, stream["actors"], spec.use_gpu),
        }
        if ray.cluster_resources().get("GPU", 0) and not stream["gpus"]:
            print0(
                f"the cluster's GPUs do not hold {spec.workers} x data.lm_actors={stream['actors']} LM actors beside "
                f"the workers: the LM actors run on data.lm_actor_cpus={stream['actor_cpus']:g} CPUs each"
            )
        # each layout's workers bring their own LM actors (CPU ones count here)
        actor_cpus = 0.0 if stream["gpus"] else stream["actors"] * stream["actor_cpus"]
        check = CapacityCheck(spec.cpus_per_worker, spec.use_gpu, 0.0, actor_cpus)
    else:
        check = CapacityCheck(spec.cpus_per_worker, spec.use_gpu, spec.data_cpus)
    worker_config = {
        **spec.worker_config,
        "cache": {**cache, "remedy": spec.cache_remedy},
        "stream": stream,
        "layouts": [vars(layout) for layout in spec.layouts],
        "elastic": spec.elastic,
        "capacity": vars(check),
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=worker_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec.workers, use_gpu=spec.use_gpu, resources_per_worker={"CPU": spec.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=spec.run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            # unlimited for Ray: the policy counts crashes against spec.max_failures itself, so that a
            # preemption (every rank checkpointed and left) restarts without spending one
            failure_config=ray.train.FailureConfig(max_failures=-1),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # a corrupt shard ends the run (no restarts); a storage fault waits for storage first
            # and a restart that the cluster cannot hold waits for nodes, shrinks (elastic) or ends
            callbacks=[
                failure_policy(probes, retry_s, spec.max_failures),
                capacity_gate(spec.layouts, spec.elastic, check, spec.node_wait_s),
            ],
        ),
    )
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as exc:
        # in the controller's order: a corrupt shard first (its message carries the remedy, peers
        # only echo it), then storage (the policy's stop, or faults that used up the restarts or
        # failed Ray Train's controller itself), then the rest
        cause = first_cause([exc], REPORTED[:2])
        fault = None if cause is not None else storage_fault([exc])
        if fault is not None:
            cause = stopped_by_storage(storage.redact(spec.storage_url), fault)
        raise RunFailed(str(exc), cause or first_cause([exc])) from exc
    except ray.exceptions.RayActorError as exc:  # Ray Train's controller could not even start
        raise RunFailed(str(exc), ControllerStartFailed(controller_start_line(exc, spec.storage_url))) from exc


class ControllerStartFailed(RuntimeError):
    """Ray Train's controller died in its creation (it checks the run's storage there)."""


def controller_start_line(error: BaseException, storage_url: str) -> str:
    """One line for a controller that could not start: the innermost error behind Ray's wrappers,
    and what to check when it is a storage credential missing on the cluster's nodes."""
    from saescale.console import first_line
    from saescale.service.failures import innermost

    cause = innermost(error)
    what = f"{type(cause).__name__}: {first_line(cause)}"
    if cause is error:  # Ray passes the creation task's error as text: its last "XError: ..." line
        raised = re.findall(
            r"^\s*(?:\x1b\[[\d;]*m)?(?:\(.*?\)\s*)?(?:\x1b\[[\d;]*m)?\s*([\w.]+(?:Error|Exception): .+)$",
            str(error),
            re.M,
        )
        what = raised[-1].strip() if raised else what
    line = storage.redact(f"Ray Train's controller could not start: {what}")
    if "Credentials" in what:
        line += (
            f" (storage.url={storage.redact(storage_url)}: the cluster's nodes need the storage credentials "
            "in their environment, e.g. AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an instance role)"
        )
    return line


def registered_steps(run_folder: str) -> list[int]:
    """The steps of the checkpoints Ray Train has registered for a run, from its controller's
    snapshot in the run's storage folder (local). Ray registers a reported checkpoint when its
    controller next polls the workers (about every 2 s): a checkpoint whose workers die before
    that is lost, and a restart resumes from the one before."""
    try:
        with open(os.path.join(run_folder, "checkpoint_manager_snapshot.json")) as handle:
            results = json.load(handle)["checkpoint_results"]
    except (OSError, ValueError, KeyError):
        return []
    return [int(r["metrics"]["step"]) for r in results if "step" in r.get("metrics", {})]


def checkpoint_url(result, storage_url: str) -> str:
    """An fsspec URL for the Result's checkpoint folder (Ray gives a path inside its filesystem)."""
    path = result.checkpoint.path
    if "://" in storage_url and not storage_url.startswith("file://"):
        return f"{storage_url.split('://', 1)[0]}://{path}"
    return path
