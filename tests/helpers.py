"""Shared test helpers (importable from test modules and from processes they spawn)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from saescale.core.config import SAEConfig
from saescale.core.model import TopKSAE

# what every rank process of the gloo tests imports: the fork server imports it once
RANK_PRELOAD = [
    "torch",
    "torch.distributed",
    "safetensors.torch",
    "pytest",
    "saescale.train.trainer",
    "saescale.train.rank_setup",
    "saescale.train.checkpoint",
    "saescale.distributed.mesh",
    "helpers",
]


def spawn_ranks(fn, args: tuple, nprocs: int) -> None:
    """`torch.multiprocessing.spawn(fn, args, nprocs)` (each rank `fn(rank, *args)`, an error in
    any rank raised here), with the ranks forked from a fork server that imported torch and
    saescale once for this test process: a spawned rank imports them itself, ~2.6 s of CPU each,
    and the gloo tests start ~90 ranks (10% of the suite's CPU, measured). The fork server starts
    with the first call and has the environment of that moment; the ranks take what they need
    as arguments."""
    import multiprocessing

    import torch.multiprocessing as mp

    multiprocessing.set_forkserver_preload(RANK_PRELOAD)  # before the server starts; no-op after
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")


def perturbed_sae(cfg: SAEConfig, generator: torch.Generator) -> TopKSAE:
    """An SAE with the paper's init, then encoder, biases and b_pre perturbed so that encoder
    and decoder gradients differ and every bias gets a gradient."""
    sae = TopKSAE(cfg)
    sae.reset_parameters(generator=generator)
    with torch.no_grad():
        sae.W_enc.add_(0.05 * torch.randn(sae.W_enc.shape, generator=generator))
        sae.b_enc.copy_(0.1 * torch.randn(sae.b_enc.shape, generator=generator))
        sae.b_pre.copy_(0.1 * torch.randn(sae.b_pre.shape, generator=generator))
    return sae


def stop_ray_started_in(ray_tmp: str, timeout_s: float = 5.0) -> int:
    """Stop the one Ray cluster whose RAY_TMPDIR is `ray_tmp` (e.g. a test's `ray start --head`),
    by PID: `ray stop` stops every Ray process on the machine, other people's clusters too.
    Its processes name that folder in their command line or environment; their children (the
    workers, agents, dashboard modules) go with them. Returns how many processes were stopped.
    A head's gcs_server and monitor outlive SIGTERM (measured: still alive after 30 s), so the
    wait before SIGKILL is short: a longer one only adds its whole length to every stop."""
    import psutil

    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline", "environ"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if ray_tmp in cmdline or (proc.info["environ"] or {}).get("RAY_TMPDIR") == ray_tmp:
            found[proc.pid] = proc
            with contextlib.suppress(psutil.Error):
                found.update({child.pid: child for child in proc.children(recursive=True)})
    procs = [p for pid, p in found.items() if pid != os.getpid()]
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=timeout_s)
    return len(procs)


def ray_job_submit(cmd: list[str], tries: int = 4, **run_kwargs):
    """Run a `ray job submit ...` command line, again while the job server answers that its job
    agent is not up yet ("No available agent to submit job, please try again later": on a loaded
    machine the agent of a fresh `ray start --head` can take longer than the 10 s the server waits
    for it). Nothing was submitted then, so trying again is safe. Returns the CompletedProcess."""
    import subprocess

    for _ in range(tries):
        proc = subprocess.run(cmd, capture_output=True, text=True, **run_kwargs)
        if proc.returncode == 0 or "No available agent to submit job" not in proc.stdout + proc.stderr:
            return proc
    return proc


def start_ray_head(env: dict[str, str], num_cpus: int | None = 2, timeout_s: float = 180) -> tuple[str, str]:
    """`ray start --head` on loopback, every port free (the dashboard agent's too: another Ray on
    the machine holds the default 52365), in env's RAY_TMPDIR; returns (GCS address, job server
    URL). `num_cpus=None`: Ray's default, the machine's CPU count, as the README's command has it.
    Stop it with `stop_ray_started_in(env["RAY_TMPDIR"])`, never `ray stop`."""
    import subprocess
    import sys

    from saescale.net import free_port

    gcs, dash = free_port(), free_port()
    start = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "ray"),
            "start",
            "--head",
            *([f"--num-cpus={num_cpus}"] if num_cpus is not None else []),
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--port={gcs}",
            f"--dashboard-agent-listen-port={free_port()}",
            "--disable-usage-stats",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert start.returncode == 0, start.stderr[-2000:]
    return f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"


@contextlib.contextmanager
def ray_head(env: dict[str, str], num_cpus: int | None = None):
    """`ray start --head` on loopback with its own temp dir; yields (GCS address, dashboard address).
    With the machine's own CPU count by default, as the README starts it: on a 2-core machine
    that leaves no CPU beside 2 training workers, and the job must fit its reads in anyway."""
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's socket paths must stay short
    env.update(
        RAY_TMPDIR=ray_tmp,
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_DATA_USE_DATASOURCE_V2="0",
        PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
    )
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = start_ray_head(env, num_cpus)
    try:
        yield gcs, dashboard
    finally:
        stop_ray_started_in(ray_tmp)  # not `ray stop`: it would stop every Ray on the machine


def rows_trained(rows_dir) -> dict[int, list[int]]:
    """Each step's rows over all ranks, from the last attempt that trained the step."""
    per_rank_step: dict[tuple[int, int], list[int]] = {}
    for path in rows_dir.glob("rows_rank*.jsonl"):
        rank = int(path.stem.removeprefix("rows_rank"))
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            per_rank_step[(rank, rec["step"])] = rec["ids"]  # a re-trained step overwrites
    steps: dict[int, list[int]] = {}
    for (_, step), ids in sorted(per_rank_step.items()):
        steps.setdefault(step, []).extend(ids)
    return steps


def wait_for(path, proc: subprocess.Popen, timeout_s: float = 300.0) -> str:
    """The file's text once it exists (written by the held rank 0); fails if the job ends first."""
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"the job ended (exit {proc.returncode}) before {path}:\n{out[-4000:]}")
        assert time.monotonic() < deadline, f"no {path} after {timeout_s} s"
        time.sleep(0.1)  # polling for a file the job writes: the wait is on its condition
    with open(path) as handle:
        return handle.read()


def wait_registered(run_dir, step: int, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    """Until Ray Train registered the step's checkpoint (`ray_train.registered_steps`: a checkpoint
    reported by workers that die before the controller's next poll is never registered, as on a
    real cluster)."""
    from saescale.service.ray_train import registered_steps

    deadline = time.monotonic() + timeout_s
    while step not in registered_steps(str(run_dir)):
        assert proc.poll() is None, f"the job ended (exit {proc.returncode}) before checkpoint {step} registered"
        assert time.monotonic() < deadline, f"checkpoint {step} not registered after {timeout_s} s"
        time.sleep(0.1)
