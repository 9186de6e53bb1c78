"""`hydra/launcher=saescale_ray_jobs`: a Hydra multirun whose jobs are Ray Jobs.

    python jobs/train.py -m sae.n_latents=2048,4096,8192,16384 sae.k=16,32,64

Each job of the multirun becomes one training run submitted to the Ray cluster's job server
(`saescale.sweeps.ray_jobs`), several at once as the cluster's CPUs/GPUs allow (`saescale.sweeps.scheduler`); a
failed run is reported and the others go on; a run that already wrote its result.json under the
same config (its config_hash) is skipped, so re-running the sweep resumes it. The sweep directory
gets results.parquet/.csv (one row per run: settings, status, final metrics, tokens, compute, job
times), timeline.png and each run's job log.
Hydra exits non-zero if any run failed, after every run has ended.
"""

# no `from __future__ import annotations`: Hydra executes this module without registering it in
# sys.modules, and dataclasses then cannot resolve string annotations
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from saescale import storage

log = logging.getLogger(__name__)


@dataclass
class RayJobsLauncherConf:
    _target_: str = "hydra_plugins.saescale_launcher.ray_jobs_launcher.RayJobsLauncher"
    address: str | None = None  # null: RAY_ADDRESS if set, else an embedded local Ray; or http://head:8265
    max_concurrent: int | None = None  # null: as many runs as the cluster's CPUs/GPUs hold
    num_cpus: int | None = None  # logical CPUs of the embedded local Ray (null: 2 x cores)
    data_cpus: float = 1.0  # CPUs a run's Ray Data reading holds beside its training workers
    poll_s: float = 2.0
    skip_finished: bool = True  # re-running the sweep skips runs that wrote result.json under their config


ConfigStore.instance().store(group="hydra/launcher", name="saescale_ray_jobs", node=RayJobsLauncherConf)


class RayJobsLauncher(Launcher):
    def __init__(
        self,
        address: str | None = None,
        max_concurrent: int | None = None,
        num_cpus: int | None = None,
        data_cpus: float = 1.0,
        poll_s: float = 2.0,
        skip_finished: bool = True,
    ) -> None:
        self.address, self.max_concurrent, self.num_cpus = address, max_concurrent, num_cpus
        self.data_cpus, self.poll_s, self.skip_finished = data_cpus, poll_s, skip_finished
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context

    def _run_of(self, num: int, overrides: list[str], group: str):
        from saescale.app.run_identity import config_hash, register_resolvers
        from saescale.sweeps.scheduler import SweepRun

        register_resolvers()
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        overrides = list(overrides)
        if cfg.wandb.get("group") is None:
            overrides.append(f"wandb.group={group}")  # one wandb group per sweep
        endpoint = cfg.storage.get("endpoint_url")
        workers, cpus = int(cfg.parallel.workers), float(cfg.parallel.cpus_per_worker)
        data_cpus = self.data_cpus
        if cfg.data.get("source") == "model":  # every worker's LM actors (CPU actors: counted as such)
            data_cpus = workers * int(cfg.data.lm_actors) * float(cfg.data.lm_actor_cpus)
        # run_id (<run_name>-<config hash>) names the run's folder and checkpoints: runs differing in
        # any setting of the trained SAE get their own, and a rerun skips only the same config
        return SweepRun(
            num=num,
            overrides=overrides,
            run_name=str(cfg.run_id),
            output_dir=storage.absolute(str(cfg.output_dir)),
            cpus=workers * cpus + data_cpus,
            gpus=float(workers) if cfg.parallel.use_gpu else 0.0,
            storage_options=storage.endpoint_options(endpoint),
            config_hash=config_hash(cfg),
        )

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from saescale.sweeps.ray_jobs import RayJobsBackend
        from saescale.sweeps.scheduler import plot_timeline, run_sweep, write_results

        assert self.config is not None and self.hydra_context is not None
        sweep_dir = storage.absolute(str(self.config.hydra.sweep.dir))
        os.makedirs(sweep_dir, exist_ok=True)
        group = os.path.basename(sweep_dir.rstrip("/"))
        runs = [self._run_of(initial_job_idx + i, list(o), group) for i, o in enumerate(job_overrides)]
        _check_distinct_outputs(runs)
        print(f"[sweep] {len(runs)} runs -> {sweep_dir}", flush=True)
        backend = RayJobsBackend(sys.argv[0], self.address, self.num_cpus)
        try:
            print(f"[sweep] Ray job server {backend.dashboard}; capacity (CPUs, GPUs) {backend.capacity}", flush=True)
            run_sweep(
                runs,
                backend,
                backend.capacity,
                self.max_concurrent,
                self.poll_s,
                log_dir=sweep_dir,
                skip_finished=self.skip_finished,
                on_change=lambda rs: write_results(rs, sweep_dir),
            )
        finally:
            write_results(runs, sweep_dir)
            plot_timeline(runs, os.path.join(sweep_dir, "timeline.png"))
            backend.close()
        self._log_wandb(runs, group, sweep_dir)
        failed = [r for r in runs if r.status == "failed"]
        print(
            f"[sweep] {len(runs) - len(failed)} finished ({sum(r.action == 'skipped' for r in runs)} skipped as "
            f"already finished), {len(failed)} failed; results: {os.path.join(sweep_dir, 'results.parquet')}",
            flush=True,
        )
        returns = []
        for run, overrides in zip(runs, job_overrides):
            ok = run.status == "finished"
            returns.append(
                JobReturn(
                    overrides=list(overrides),
                    cfg=self.config,
                    working_dir=sweep_dir,
                    task_name=run.run_name,
                    status=JobStatus.COMPLETED if ok else JobStatus.FAILED,
                    _return_value=run.result if ok else RuntimeError(f"run {run.run_name}: {run.error}"),
                )
            )
        return returns

    def _log_wandb(self, runs, group: str, sweep_dir: str) -> None:
        """The sweep's results table as one wandb run (job_type sweep) in the runs' group."""
        cfg = self.config
        if not cfg.wandb.enabled or cfg.wandb.mode == "disabled":
            return
        import wandb

        from saescale.sweeps.scheduler import results_rows

        rows = results_rows(runs)
        columns = sorted({k for r in rows for k in r})
        run = wandb.init(
            project=cfg.wandb.project,
            group=cfg.wandb.get("group") or group,
            job_type="sweep",
            name=f"sweep-{group}",
            mode=cfg.wandb.mode,
            dir=sweep_dir,
            reinit="finish_previous",
            config={"runs": len(runs), "sweep_dir": sweep_dir},
        )
        run.log(
            {"sweep/results": wandb.Table(columns=columns, data=[[_plain(r.get(c)) for c in columns] for r in rows])}
        )
        run.summary.update(
            {"finished": sum(r.status == "finished" for r in runs), "failed": sum(r.status == "failed" for r in runs)}
        )
        run.finish()


def _check_distinct_outputs(runs) -> None:
    """Two runs of one sweep must not share an output folder (one would resume or skip the other)."""
    from saescale.sweeps.scheduler import SweepError

    seen: dict[str, Any] = {}
    for run in runs:
        other = seen.setdefault(run.output_dir, run)
        if other is not run:
            raise SweepError(
                f"runs {other.num} and {run.num} would both write to {storage.redact(run.output_dir)}: "
                "put ${run_id} in output_dir (and do not set run_id) so each config gets its own folder"
            )


def _plain(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
