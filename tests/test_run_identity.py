"""A run's identity, run_id = <run_name>-<config hash>: runs that differ in any setting of the
trained SAE (train.lr, which the readable name does not show) get their own folder and
checkpoints, settings that do not change the SAE keep the run, and a sweep skips a run only when
its folder holds a result of the same config. A real sweep over train.lr (a folder and a config
hash per lr, and a rerun that skips them) runs in tests/test_sweep.py, whose Ray sweep varies lr."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from saescale import storage
from saescale.app.run_identity import config_hash, identity_config
from saescale.app.schema import register_configs
from saescale.sweeps.scheduler import SweepRun, finished_same_config, run_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compose_train(*overrides: str, hydra: bool = False):
    """conf/train.yaml as the job sees it (Hydra's compose API, our resolvers registered)."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base=None):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)


@pytest.mark.parametrize(
    "override",
    [
        "train.lr=0.001",
        "train.max_steps=10",
        "train.seed=1",
        "sae.auxk_coef=0.1",
        "data.cache=/elsewhere/cache",
        "data.shuffle_buffer_rows=0",
        "data.holdout_shards=2",
        "parallel.workers=4",  # 4 streams (data.streams defaults to the worker count)
        "data.streams=4",
        "parallel.use_gpu=true",
        "train.precision=bf16",  # a precision sweep keeps its runs apart
        "train.precision=fp32",
    ],
)
def test_a_setting_of_the_trained_sae_changes_the_identity(override):
    base, other = compose_train(), compose_train(override)
    assert config_hash(other) != config_hash(base)
    assert other.run_id != base.run_id and other.output_dir != base.output_dir
    assert other.run_id.startswith("resid8-n4096-k32-")  # the readable part stays


@pytest.mark.parametrize(
    "override",
    [
        "train.log_every=1",
        "train.checkpoint_every=7",
        "wandb.mode=disabled",
        "wandb.group=g",
        "export.saelens=false",
        "export.evaluate=false",
        "ray.address=auto",
        "ray.max_failures=0",
        "parallel.memory_per_worker_gib=8",
        "parallel.cpus_per_worker=2",
        "parallel.tp=1",  # the same rows per step on any layout
        "data.streams=2",  # the default's resolved value
        "ray.node_wait_s=5",
        "data.heldout_tokens=16",
        "data.prefetch_batches=1",
        "data.endpoint_url=http://127.0.0.1:9",
        "fault.step=3",
        "debug.record_rows=true",
        "storage.url=s3://b/ray",
        "output_dir=s3://b/out",
        "train.micro_batches=4",  # the same batch-level step
        "train.micro_batches=auto",
        "data.lm.layer=3",  # the model stream's settings, while the run reads the cache
    ],
)
def test_settings_that_do_not_change_the_sae_keep_the_identity(override):
    assert compose_train(override).run_id == compose_train().run_id


def test_settings_added_later_are_left_out_at_their_defaults():
    """train.precision at its default (auto), train.lr_scale at 1 and train.lr_rule with a set lr
    are left out of the hash, so a run started before such a setting existed is found again (and
    resumed) by the same command."""
    cfg = compose_train()
    before = identity_config(cfg)
    assert "precision" not in before["train"] and "micro_batches" not in before["train"]
    assert "lr_scale" not in identity_config(compose_train("train.lr_scale=1"))["train"]
    assert config_hash(compose_train("train.lr_scale=2")) != config_hash(cfg)
    # with train.lr set, the rule is moot and left out
    assert "lr_rule" not in identity_config(compose_train("train.lr=0.001"))["train"]
    assert config_hash(compose_train("train.lr=0.001")) == config_hash(
        compose_train("train.lr=0.001", "train.lr_rule=paper")
    )


def test_the_layout_is_not_the_identity_but_the_streams_are():
    """A step reads the same rows on any layout of the same data.streams, so a run keeps its id
    when it moves to another layout (elastic, or resumed on fewer workers after a node loss);
    data.streams (by default the worker count) decides what each step reads."""
    two = compose_train()  # 2 workers: 2 streams
    assert identity_config(two)["data"]["streams"] == 2 and "workers" not in identity_config(two)["parallel"]
    assert config_hash(compose_train("parallel.workers=1", "parallel.tp=1", "data.streams=2")) == config_hash(two)
    assert config_hash(compose_train("parallel.elastic=true", "parallel.min_workers=1")) == config_hash(two)
    assert config_hash(compose_train("parallel.workers=1", "parallel.tp=1")) != config_hash(two)  # 1 stream


def test_credentials_in_the_cache_url_do_not_enter_the_identity():
    plain = compose_train("data.cache=s3://bucket/cache")
    assert config_hash(compose_train("data.cache=s3://AKIA:s3cr3t@bucket/cache")) == config_hash(plain)


def test_an_explicit_run_name_keeps_the_hash_and_an_explicit_run_id_is_the_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("SAESCALE_RUNS", str(tmp_path))
    cfg = compose_train("run_name=mine", "train.lr=0.001")
    assert cfg.run_id == f"mine-{config_hash(cfg)}" and cfg.output_dir == f"{tmp_path}/{cfg.run_id}"
    assert compose_train("run_id=fixed").output_dir == f"{tmp_path}/fixed"


def test_hydra_files_stay_local_when_output_dir_is_remote(monkeypatch, tmp_path):
    monkeypatch.setenv("SAESCALE_RUNS", str(tmp_path))
    remote = compose_train("output_dir=s3://bucket/out/run", hydra=True)
    assert remote.hydra.run.dir == os.path.join(str(tmp_path), "hydra", remote.run_id)
    local = compose_train(hydra=True)
    assert local.hydra.run.dir == os.path.join(local.output_dir, "hydra")


def test_a_sweep_skips_only_a_result_written_under_the_same_config(tmp_path):
    run = SweepRun(num=0, overrides=[], run_name="a", output_dir=str(tmp_path / "a"), cpus=1, config_hash="c0ffee00")
    assert not finished_same_config(run, None)
    assert not finished_same_config(run, {"steps": 4})  # a result from before config hashes
    assert not finished_same_config(run, {"config_hash": "deadbeef", "steps": 4})
    assert finished_same_config(run, {"config_hash": "c0ffee00", "steps": 4})
    storage.write_json_atomic(run.result_url, {"config_hash": "c0ffee00", "steps": 4})
    run_sweep([run], backend=None, capacity=(4.0, 0.0))  # nothing to run: no backend call
    assert run.action == "skipped" and run.result["steps"] == 4


def sweep(tmp_path, cache: str, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SAESCALE_RUNS=str(tmp_path), WANDB_MODE="offline", RAY_DEDUP_LOGS="0")
    env.pop("RAY_ADDRESS", None)
    cmd = [
        sys.executable,
        os.path.join(ROOT, "jobs", "train.py"),
        "-m",
        "train.lr=0.001,0.003",
        f"data.cache={cache}",
        "data.heldout_tokens=256",
        "data.shuffle_buffer_rows=256",
        "sae.n_latents=256",
        "sae.k=8",
        "parallel.workers=1",
        "parallel.tp=1",
        "train.batch_size=256",
        "train.max_steps=4",
        "export.saelens=false",
        "export.sparsify=false",
        "wandb.enabled=false",
        f"hydra.sweep.dir={tmp_path}/sweeps/lr",
        "hydra.launcher.num_cpus=4",
        "hydra.launcher.poll_s=0.5",
        *overrides,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)


def test_a_sweep_whose_runs_share_an_output_dir_is_refused(tmp_path):
    proc = sweep(tmp_path, str(tmp_path / "cache"), f"output_dir={tmp_path}/same")  # refused before any read
    assert proc.returncode != 0
    assert f"runs 0 and 1 would both write to {tmp_path}/same" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "same").exists()


def test_a_model_streamed_run_is_named_by_its_lm_settings_not_by_its_actors():
    streamed = compose_train("data.source=model")
    assert streamed.run_id != compose_train().run_id
    for same in ("data.lm_actors=4", "data.lm_actor_cpus=2", "data.cache_write=/w", "data.cache=/elsewhere"):
        assert compose_train("data.source=model", same).run_id == streamed.run_id, same
    for other in ("data.lm.layer=3", "data.lm.max_tokens=1000", "data.lm.corpus=/texts"):
        assert compose_train("data.source=model", other).run_id != streamed.run_id, other
