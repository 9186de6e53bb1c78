"""The Ray training job end to end on the embedded default's real activations (SmolLM2 layer 8
on Shakespeare): Ray Data -> Ray Train workers (tp=2) -> per-rank checkpoints -> streamed export.

- one run (a module fixture) whose driver is restarted and whose worker is SIGKILLed inside a
  checkpoint save: each test checks one thing of it (resume points, every row trained once, the
  gathered SAE and exports, metrics and wandb, the evaluation job on its SAE, the same steps as
  a dp=2 run, a quiet console beside a running `ray start --head`).
`ray job submit` to a head, and the job's refusals of bad settings: tests/test_train_job_submit.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch

from helpers import ray_head, rows_trained
from saescale.data.format import POS_STRIDE
from saescale.formats.saved import load_sae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
BATCH = 256


def job_args(cache: str, *overrides: str) -> list[str]:
    # run_id=tiny pins the run's folder (no config hash), so a rerun with other max_steps resumes it;
    # the paper's lr rule keeps the lr fixed across those reruns (the budget rule would follow the
    # run's length, and a resume at another lr is refused) and keeps these tiny runs' lr moderate
    defaults = [
        "run_id=tiny",
        "train.lr_rule=paper",
        f"data.cache={cache}",
        "data.heldout_tokens=512",
        "sae.n_latents=1024",
        "sae.k=16",
        f"train.batch_size={BATCH}",
        "train.log_every=2",
        "train.checkpoint_every=4",
        "train.epochs=1",
        "data.shuffle_buffer_rows=512",
    ]
    keys = {o.split("=", 1)[0] for o in overrides}
    return [d for d in defaults if d.split("=", 1)[0] not in keys] + list(overrides)


def run_job(tmp_path, cache, *overrides, env=None):
    env = dict(env or os.environ, SAESCALE_RUNS=str(tmp_path), WANDB_MODE="offline", RAY_DEDUP_LOGS="0")
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, os.path.join(ROOT, "jobs", "train.py"), *job_args(cache, *overrides)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def training_row_ids(cache: str) -> set[int]:
    """(window, pos) of every row in the training shards (shard 0 is held out)."""
    with open(os.path.join(cache, "manifest.json")) as handle:
        manifest = json.load(handle)
    ids: set[int] = set()
    for shard in manifest["shards"][1:]:
        table = pq.read_table(os.path.join(cache, shard["file"]), columns=["window", "pos"])
        ids.update(
            int(w) * POS_STRIDE + int(p)
            for w, p in zip(table.column("window").to_pylist(), table.column("pos").to_pylist())
        )
    return ids


# the first launch of the resumed run; the dp=2 run repeats it with parallel.tp=1
FIRST_LAUNCH = ("train.max_steps=4", "train.log_every=1", "debug.record_rows=true")


@pytest.fixture(scope="module")
def ray_head_env(tmp_path_factory):
    """One `ray start --head` (the machine's CPU count, its own temp dir) for the module: the
    resumed run starts its embedded Ray beside it, as a new user following the README would.
    Yields (env with the head's RAY_TMPDIR, the GCS address)."""
    env = dict(os.environ, WANDB_MODE="offline")
    with ray_head(env) as (gcs, _):
        yield env, gcs


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, small_cache, ray_head_env):
    """One run interrupted twice: the driver stops after 4 steps (as if it were restarted there);
    the rerun of the same command resumes at step 4, and rank 1 is SIGKILLed while saving the
    step-8 checkpoint, so that checkpoint never registers and the new worker group resumes from 4.
    Both launches start their own embedded Ray while the module's `ray start --head` runs, in the
    same RAY_TMPDIR (its address in Ray's current-cluster file), as a new user following the README.
    The first launch's SAE and metrics are kept in `first/` (the second launch replaces them).
    Returns (runs dir, the run's folder, the second launch's log, the first launch's result)."""
    head_env = ray_head_env[0]
    runs = tmp_path_factory.mktemp("resumed")
    run_job(runs, small_cache, *FIRST_LAUNCH, env=head_env)
    first = json.loads((runs / "tiny" / "result.json").read_text())
    shutil.copytree(runs / "tiny" / "sae", runs / "first" / "sae")
    shutil.copy(runs / "tiny" / "metrics.jsonl", runs / "first" / "metrics.jsonl")
    log = run_job(
        runs,
        small_cache,
        "debug.record_rows=true",
        "fault.rank=1",
        "fault.step=8",
        "fault.during_save=true",
        env=head_env,
    )
    return runs, runs / "tiny", log, first


@pytest.mark.slow
def test_a_driver_restart_and_a_killed_worker_both_resume_from_the_last_registered_checkpoint(resumed_run, small_cache):
    _, out, log, first = resumed_run
    assert first["steps"] == 4
    assert (out / ".fault-injected").read_text() == "8"
    # resumed twice from step 4 (driver restart, then after the kill); never from the lost step 8
    assert log.count("resumed from the step-4 checkpoint") >= 2, log[-4000:]
    assert "resumed from the step-8 checkpoint" not in log
    result = json.loads((out / "result.json").read_text())
    # one epoch: equal splits give each of the 2 ranks floor(rows / 2) rows, in whole batches
    steps = (len(training_row_ids(small_cache)) // 2) // (BATCH // 2)
    assert result["steps"] == steps and result["tokens"] == steps * BATCH


@pytest.mark.slow
def test_the_resumed_run_trains_every_training_row_exactly_once(resumed_run, small_cache):
    _, out, _, _ = resumed_run
    train_ids = training_row_ids(small_cache)
    steps = (len(train_ids) // 2) // (BATCH // 2)
    trained = rows_trained(out / "rows")
    assert sorted(trained) == list(range(1, steps + 1))
    all_rows = [i for ids in trained.values() for i in ids]
    assert all(len(ids) == BATCH for ids in trained.values())
    assert len(set(all_rows)) == len(all_rows) == steps * BATCH  # no row trained twice
    assert set(all_rows) <= train_ids  # only the epoch's remainder (< 2 batches) is left out
    assert len(train_ids) - len(all_rows) < 2 * BATCH


@pytest.mark.slow
def test_the_gathered_sae_and_its_exports_match_the_last_checkpoint(resumed_run):
    _, out, _, _ = resumed_run
    result = json.loads((out / "result.json").read_text())
    sae, _ = load_sae(str(out / "sae"))
    halves = [load_sae_shard(result["checkpoint"], r) for r in range(2)]
    torch.testing.assert_close(sae.W_dec.detach(), torch.cat([h["W_dec"] for h in halves]))
    assert 0 < result["heldout_nmse"] < 1.0 and result["dead_fraction"] is not None
    # what a report needs without the Hydra config: held-out L0 and dead fraction, the settings
    assert result["heldout_l0"] == pytest.approx(16) and 0 <= result["heldout_dead_fraction"] <= 1
    assert result["heldout_tokens"] == 512 and "nmse_at_k" not in result  # export.test_time_k: none asked
    assert result["sae"]["n_latents"] == 1024 and result["train"]["batch_size"] == BATCH
    assert result["lr"] == pytest.approx(2e-4 / (1024 / 2**14) ** 0.5)  # lr_rule=paper, lr_scale 1
    for rel in ("export/saelens/sae_weights.safetensors", "export/sparsify/sae.safetensors"):
        assert (out / rel).exists(), rel


@pytest.mark.slow
def test_metrics_time_split_and_wandb_are_written(resumed_run):
    _, out, _, _ = resumed_run
    result = json.loads((out / "result.json").read_text())
    assert result["data_wait_frac"] is not None and result["comm_bytes_per_step"] > 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("dead_fraction" in m and "time/comm_s" in m for m in metrics)
    assert list((out / "wandb").glob("offline-run-*/*.wandb"))


@pytest.mark.slow
def test_eval_job_on_the_trained_sae(resumed_run, small_cache):
    """Held-out reconstruction, the spliced model, N2G explanations and ablation sparsity."""
    runs, out, _, _ = resumed_run
    result = json.loads((out / "result.json").read_text())
    env = dict(os.environ, SAESCALE_RUNS=str(runs), WANDB_MODE="offline")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "jobs", "eval.py"),
            "run_name=tiny",
            f"data.cache={small_cache}",
            "data.heldout_tokens=512",
            "downstream.windows=4",
            "explain.latents=4",
            "explain.windows=8",
            "ablation.positions=2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluation = json.loads((out / "eval" / "results.json").read_text())
    assert evaluation["schema"] == "saescale.eval.v1" and evaluation["reconstruction"]["tokens"] == 512
    assert evaluation["reconstruction"]["nmse"] == pytest.approx(result["heldout_nmse"], rel=1e-4)
    down = evaluation["downstream"]
    assert down["tokens"] == 4 * 63 and down["ce_zero_ablation"] > down["ce_clean"] > 0
    assert (out / "eval" / "latent_density.png").exists()
    explained = evaluation["explanations"]
    assert len(explained["latents"]) == 4 and explained["train_windows"] == explained["test_windows"] == 4
    # a latent whose firing needs more than max_context tokens gets no pattern; most get one
    assert sum(bool(entry["patterns"]) for entry in explained["latents"]) >= 2
    assert 0 <= explained["mean_precision"] <= 1 and 0 <= explained["mean_recall"] <= 1
    ablation = evaluation["ablation_sparsity"]
    assert ablation["positions"] == 2 and ablation["pairs"] + ablation["skipped"] == 2 * 16  # k=16 latents each
    assert 0 < ablation["mean"] <= 1


def load_sae_shard(checkpoint: str, tp_rank: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from saescale.train.checkpoint import shard_name

    return load_file(os.path.join(checkpoint, f"{shard_name(tp_rank, 2)}.sae.safetensors"))


@pytest.mark.slow
def test_dp2_and_tp2_jobs_take_the_same_steps(tmp_path, small_cache, resumed_run):
    """Through the real Ray job: 2 workers as dp=2 x tp=1 and as dp=1 x tp=2 (the resumed run's
    first launch) read the same streams (the split depends only on the worker count), so they
    must log the same losses and end with the same SAE (the engine-level test compares against
    one process)."""
    runs, _, _, _ = resumed_run
    run_job(
        tmp_path,
        small_cache,
        "run_id=tp1",
        "parallel.tp=1",
        *FIRST_LAUNCH,
        "export.saelens=false",
        "export.sparsify=false",
    )
    results = {}
    for layout, out in (("parallel.tp=1", tmp_path / "tp1"), ("parallel.tp=2", runs / "first")):
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses = [m["loss"] for m in metrics if "loss" in m]
        results[layout] = (losses, load_sae(str(out / "sae"))[0])
    (loss_dp, sae_dp), (loss_tp, sae_tp) = results.values()
    assert len(loss_dp) == len(loss_tp) == 4
    torch.testing.assert_close(torch.tensor(loss_dp), torch.tensor(loss_tp), rtol=1e-4, atol=1e-6)
    for name in ("W_enc", "b_enc", "W_dec", "b_pre"):
        torch.testing.assert_close(getattr(sae_dp, name), getattr(sae_tp, name), rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_embedded_ray_beside_a_running_head_with_a_quiet_console(resumed_run, ray_head_env):
    """The README's `ray start --head` is running (its address in Ray's current-cluster file), and
    `python jobs/train.py` with no address (the resumed run's second launch) must start its own
    Ray, say so, and train. Its console has the progress bars and the summary but not Ray's own
    noise (the placement-group cleaner's State API warning every second, Ray Data's per-epoch
    execution blocks); the worker killed mid-run still shows its error lines, and Ray's log files
    keep everything."""
    _, out, console, _ = resumed_run
    env, head_gcs = ray_head_env
    ray_tmp = env["RAY_TMPDIR"]
    with open(os.path.join(ray_tmp, "ray", "ray_current_cluster")) as current:
        assert head_gcs.split(":")[1] in current.read()  # where a bare ray.init() would go
    steps = json.loads((out / "result.json").read_text())["steps"]
    assert "num_cpus and num_gpus must not be provided" not in console
    started = [line for line in console.splitlines() if line.startswith("[saescale] Ray: ")]
    assert len(started) == 1 and "started an embedded local Ray" in started[0], started
    # the worker SIGKILLed at step 8: Ray's error lines still reach the console, and the run restarts
    assert "A worker died or was killed" in console or "ActorDiedError" in console, console[-4000:]
    assert "[FailurePolicy] RETRY" in console, console[-4000:]
    assert f"{steps}/{steps}" in console and f'"steps": {steps}' in console  # the progress bar and the summary
    for noise in (
        "PlacementGroupCleaner",
        "State API",
        "Starting execution of Dataset",
        "Execution plan of Dataset",
        "execution finished in",
        "Progress bars disabled",
        "Estimated parquet",
    ):
        assert noise not in console, (noise, console[-4000:])
    # ... all of it is still in the embedded Ray's log files
    logs = re.search(r"logs in (\S+/logs)\)", started[0]).group(1)
    assert logs.startswith(ray_tmp) and os.path.isdir(logs)
    with open(os.path.join(logs, "ray-data", "ray-data.log")) as handle:
        data_log = handle.read()
    assert "Execution plan of Dataset" in data_log and "execution finished in" in data_log
    assert any(name.startswith("worker-") and name.endswith(".err") for name in os.listdir(logs))
    assert os.path.exists(os.path.join(logs, "raylet.out"))


@pytest.mark.slow
def test_auto_checkpoints_agree_across_ranks_and_upload_in_the_background(tmp_path, small_cache):
    """train.checkpoint_every=auto through the real job at dp=2: the first checkpoint at step 20,
    then the Young/Daly interval, which both ranks compute from the same (maximum) times, or the
    save (a collective) would hang; every checkpoint is uploaded in the background and the run
    ends with its final one registered and exported."""
    log = run_job(
        tmp_path,
        small_cache,
        "run_id=auto",
        "parallel.tp=1",
        "train.epochs=3",
        "train.checkpoint_every=auto",
        "ray.mtbf_s=1",
        "export.saelens=false",
        "export.sparsify=false",
    )
    result = json.loads((tmp_path / "auto" / "result.json").read_text())
    assert result["steps"] == 36 and result["dp"] == 2  # 3 epochs of 12 steps
    assert "checkpoint_every=auto: every" in log and "from step 20" in log, log[-3000:]
    assert isinstance(result["checkpoint_every"], int) and result["checkpoint_every"] >= 1
    assert result["checkpoint_stall_s"] > 0
    assert os.path.exists(os.path.join(result["checkpoint"], "meta.json"))
    assert result["train"]["checkpoint_mtbf_s"] == 1.0 and result["train"]["checkpoint_every"] == "auto"


@pytest.mark.slow
def test_a_preempted_rank_checkpoints_and_the_run_resumes_without_spending_a_restart(
    tmp_path, small_cache, resumed_run
):
    """SIGTERM (a spot reclaim's or Kubernetes' notice) to rank 1 after step 5: every rank stops
    at the next step boundary, checkpoints there and leaves; the new worker group resumes from
    that step (nothing lost) although ray.max_failures=0, since a preemption is not a failure;
    the final SAE is bit-identical to the resumed run's (itself equal to an uninterrupted one)."""
    log = run_job(
        tmp_path,
        small_cache,
        "run_id=preempt",
        "fault.rank=1",
        "fault.step=5",
        "fault.signal=term",
        "ray.max_failures=0",
        "export.saelens=false",
        "export.sparsify=false",
    )
    assert log.count("SIGTERM: a preemption notice") in (1, 2), log[-4000:]  # rank 1's (Ray may echo it)
    # the signal lands while step 6 may already run: the next step boundary is 5 or 6
    # rank 0's line, or the controller's (Ray may not forward a worker's last lines before it goes)
    stop = re.search(r"every rank stops at step (\d+) and checkpoints there", log) or re.search(
        r"preempted at step (\d+); its checkpoint is registered", log
    )
    assert stop and stop.group(1) in ("5", "6"), log[-4000:]
    assert f"resumed from the step-{stop.group(1)} checkpoint" in log, log[-4000:]  # nothing lost
    assert "not counted against ray.max_failures" in log, log[-4000:]
    _, tiny, _, _ = resumed_run
    result = json.loads((tmp_path / "preempt" / "result.json").read_text())
    assert result["steps"] == json.loads((tiny / "result.json").read_text())["steps"]
    preempted, reference = load_sae(str(tmp_path / "preempt" / "sae"))[0], load_sae(str(tiny / "sae"))[0]
    for name in ("W_enc", "b_enc", "W_dec", "b_pre"):
        assert torch.equal(getattr(preempted, name), getattr(reference, name)), name
