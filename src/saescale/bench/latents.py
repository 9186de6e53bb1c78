"""`saescale bench latents`: the paper's latent count (2^24) built for real, at a width that fits
this machine, through the real jobs.

1. a real transformer of width `d_model` (`lm.tiny`: a randomly initialised Llama with the
   embedded default's tokenizer, saved as a local model folder, as a user's model would be);
2. its activations cached by the cache job (`jobs/cache.py`, in-process) from the embedded corpus;
3. the training job (`jobs/train.py`: Ray Data, Ray Train, tp over `workers`), `2^log2_latents`
   latents, micro-batched as the planner says, checkpointing every `checkpoint_every` steps,
   rank 0 SIGKILLed once Ray registered the second checkpoint (the group resumes from it), then
   the SAELens export and the held-out evaluation;
4. the export loaded by the real `sae_lens` (`SAE.load_from_disk`).

Prints one JSON object: the run's steps and tokens, the step it resumed from, rank 0's peak RSS
against the plan's per-rank total, the size of the last checkpoint, wall seconds per step (this
attempt's data wait + compute + communication over its steps), and the export's shape in sae_lens.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def say(line: str) -> None:
    print(f"[latents] {line}", file=sys.stderr, flush=True)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _run(
    cmd: list[str],
    env: dict[str, str],
    cwd: Path,
    log: Path,
    meanwhile: Callable[[subprocess.Popen], None] | None = None,
) -> str:
    """A job to its end, its console in `log` (returned); `meanwhile(proc)` acts on it while it runs."""
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
        if meanwhile is not None:
            meanwhile(proc)
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd[1:3])} failed (exit {code}); see {log}")
    say(f"{Path(cmd[1]).name} done in {time.monotonic() - start:.0f} s")
    return log.read_text()


def kill_rank0_when(held: Path, storage: Path, saved: int) -> Callable[[subprocess.Popen], None]:
    """SIGKILL rank 0 while it is held (`fault.hold_steps`: it wrote `held`), once Ray registered
    the checkpoint of step `saved`; then release the hold."""
    from saescale.service.ray_train import registered_steps

    def act(proc: subprocess.Popen) -> None:
        while proc.poll() is None and not (held.exists() and saved in registered_steps(str(storage))):
            time.sleep(0.2)  # polling the job's own files for the condition
        if proc.poll() is None:
            say(f"SIGKILL rank 0 at {held.name} (checkpoint {saved} registered)")
            os.kill(int(held.read_text()), signal.SIGKILL)
            held.with_name(held.name.replace("held-", "release-")).write_text("")

    return act


def bench_latents(
    project: str,
    out: str,
    log2_latents: int = 24,
    d_model: int = 16,
    k: int = 4,
    workers: int = 4,
    tp: int = 4,
    batch: int = 256,
    steps: int = 12,
    checkpoint_every: int = 4,
    max_tokens: int = 16384,
    memory_per_worker_gib: float = 3.5,
) -> dict[str, Any]:
    from saescale.lm.tiny import save_tiny_llama

    root, base = Path(project).resolve(), Path(out).resolve()
    if not (root / "jobs" / "train.py").exists():
        raise ValueError(f"no jobs/train.py under {root}: run from the project's root or pass --project")
    if steps < 2 * checkpoint_every + 1:
        raise ValueError(f"--steps must exceed two checkpoints (2 x --checkpoint-every={checkpoint_every})")
    base.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SAESCALE_RUNS=str(base / "runs"), RAY_DEDUP_LOGS="0")
    env.pop("RAY_ADDRESS", None)
    model = base / f"tiny-llama-d{d_model}"
    if not (model / "config.json").exists():
        save_tiny_llama(str(model), hidden_size=d_model, layers=2)
    cache = base / f"cache-d{d_model}"
    _run(
        [
            sys.executable,
            str(root / "jobs" / "cache.py"),
            f"model={model}",
            "layer=1",
            f"output={cache}",
            f"max_tokens={max_tokens}",
            "rows_per_shard=2048",
            "use_ray=false",
        ],
        env,
        root,
        base / "cache.log",
    )
    n_latents = 2**log2_latents
    run_id = f"latents-2e{log2_latents}-d{d_model}"
    kill_at = 2 * checkpoint_every + 1  # after the second checkpoint: the group resumes from it
    start = time.monotonic()
    log = _run(
        [
            sys.executable,
            str(root / "jobs" / "train.py"),
            f"run_id={run_id}",
            f"data.cache={cache}",
            "data.heldout_tokens=1024",
            f"sae.n_latents={n_latents}",
            f"sae.k={k}",
            f"parallel.workers={workers}",
            f"parallel.tp={tp}",
            f"train.batch_size={batch}",
            f"train.max_steps={steps}",
            "train.epochs=100",
            f"train.checkpoint_every={checkpoint_every}",
            "train.micro_batches=auto",
            f"parallel.memory_per_worker_gib={memory_per_worker_gib:g}",
            "train.log_every=1",
            f"fault.hold_steps=[{kill_at}]",
            "ray.max_failures=1",
            "wandb.mode=disabled",
            "export.saelens=true",
            "export.sparsify=false",
        ],
        env,
        root,
        base / "train.log",
        meanwhile=kill_rank0_when(
            base / "runs" / run_id / f"held-{kill_at}", base / "runs" / "ray" / run_id, 2 * checkpoint_every
        ),
    )
    wall = time.monotonic() - start
    run = base / "runs" / run_id
    result = json.loads((run / "result.json").read_text())
    resumed = re.findall(r"resumed from the step-(\d+) checkpoint", log)
    checkpoint = Path(result["checkpoint"])
    split = result.get("time_split_s") or {}
    attempt_s = sum(v or 0.0 for v in split.values())
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(run / "export" / "saelens"), device="cpu")
    report = {
        "bench": "latents",
        "n_latents": n_latents,
        "d_model": d_model,
        "k": k,
        "layout": f"dp={workers // tp} x tp={tp}",
        "batch": batch,
        "steps": result["steps"],
        "tokens": result["tokens"],
        "resumed_from_step": int(resumed[-1]) if resumed else None,
        "worker_killed_at_step": kill_at,
        "micro_batches": result["train"].get("micro_batches"),
        "memory_per_worker_gib": memory_per_worker_gib,
        "peak_rss_mb_rank0": result.get("peak_rss_mb_rank0"),
        "planned_mb_per_rank": result.get("planned_mb_per_rank"),
        "checkpoint_gib": round(folder_bytes(checkpoint) / 2**30, 3) if checkpoint.exists() else None,
        "wall_s_per_step": round(attempt_s / max(result.get("steps_this_attempt") or 1, 1), 2),
        "job_wall_s": round(wall, 1),
        "heldout_nmse": result.get("heldout_nmse"),
        "heldout_dead_fraction": result.get("heldout_dead_fraction"),
        "saelens_d_sae": sae.cfg.d_sae,
        "saelens_W_enc_shape": list(sae.W_enc.shape),
    }
    return report
