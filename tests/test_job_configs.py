"""The jobs' typed configs (Hydra structured configs in saescale.app.schema): one source for each
default, key names checked while composing, values checked before Ray or a model starts."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from saescale.app.schema import SAESection, TrainSection, register_configs
from saescale.core.config import ConfigError, SAEConfig, TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# where the job's defaults differ from the engine's, on purpose (see schema.py)
JOB_DEFAULTS = {
    "n_latents": 4096,
    "k": 32,
    "dead_tokens_threshold": 1_000_000,
    "histogram_every": 100,
    "checkpoint_every": 100,
}


def compose_job(name: str, *overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base=None):
        return compose(name, overrides=list(overrides))


@pytest.mark.parametrize("engine,section", [(SAEConfig, SAESection), (TrainConfig, TrainSection)])
def test_job_sections_take_every_engine_default(engine, section):
    ours = {f.name: f.default for f in dataclasses.fields(section)}
    for f in dataclasses.fields(engine):
        if f.name in ("d_in", "total_steps", "budget_tokens", "checkpoint_mtbf_s"):  # the cache, the run, ray.mtbf_s
            assert f.name not in ours
            continue
        assert ours[f.name] == JOB_DEFAULTS.get(f.name, f.default), f.name


@pytest.mark.parametrize("job", ["train", "cache", "eval"])
def test_a_mistyped_key_is_refused_while_composing(job):
    from hydra.errors import ConfigCompositionException

    bad = {"train": "train.lrr=1", "cache": "layr=3", "eval": "probes.token=3"}[job]
    with pytest.raises(ConfigCompositionException):
        compose_job(job, bad, "run_name=x")


@pytest.mark.parametrize(
    "override,message",
    [
        ("wandb.mode=foo", "wandb.mode must be one of offline, online, disabled"),
        ("parallel.workers=0", "parallel.workers must be > 0"),
        ("train.batch_size=0", "train.batch_size must be > 0"),
        ("data.shuffle_buffer_rows=-1", "data.shuffle_buffer_rows"),
        ("ray.max_failures=-1", "ray.max_failures must be >= 0"),
        ("ray.mtbf_s=0", "ray.mtbf_s must be > 0"),
        ("fault.signal=hup", "fault.signal must be kill or term"),
        ("parallel.min_workers=3", "parallel.min_workers=3 is above parallel.workers=2"),
        ("ray.node_wait_s=-1", "ray.node_wait_s and ray.elastic_check_s must be >= 0"),
        ("data.streams=0", "data.streams must be > 0"),
        ("data.source=lm", "data.source must be one of"),
        ("data.lm_actors=0", "data.lm_actors must be > 0"),
        ("data.cache_write=/tmp/x", "data.cache_write and data.heldout_cache are for data.source=model"),
    ],
)
def test_bad_values_fail_in_the_dataclasses(override, message):
    elastic = ("parallel.elastic=true",) if override.startswith("parallel.min_workers") else ()
    with pytest.raises(ConfigError, match=message):
        OmegaConf.to_object(compose_job("train", override, *elastic))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (("sae.architecture=relu",), "training sae.architecture=relu needs sae.l1_coef > 0"),
        (("sae.architecture=batchtopk", "sae.multi_topk=true"), "multi_topk is a TopK loss"),
        (("sae.l1_coef=0.01",), "l1_coef is ReLU's penalty"),
        (("sae.architecture=gated",), "sae.architecture must be one of topk, batchtopk, relu"),
    ],
)
def test_architecture_settings_that_cannot_train_fail_before_ray_starts(overrides, message):
    from saescale.app.train_job import engine_configs

    job = OmegaConf.to_object(compose_job("train", *overrides))
    with pytest.raises(ConfigError, match=message):
        engine_configs(job, d_in=64, total_steps=10)


def test_a_wrong_type_is_refused_while_composing():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_job("train", "sae.k=many")


def test_the_train_job_reports_bad_settings_and_a_missing_cache_in_one_line(tmp_path):
    env = dict(os.environ, SAESCALE_RUNS=str(tmp_path))
    for override, message in {
        "wandb.mode=foo": "wandb.mode must be one of",
        f"data.cache={tmp_path / 'none'}": "no manifest.json",
    }.items():
        proc = subprocess.run(
            [sys.executable, os.path.join(ROOT, "jobs", "train.py"), override],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            cwd=ROOT,
        )
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr


def test_side_files_of_a_remote_run_stay_out_of_rays_working_dir_copy(tmp_path, monkeypatch):
    """metrics, offline wandb and Hydra's files of a run whose output_dir is remote: under
    $SAESCALE_RUNS, but never inside Ray's temporary working-dir copy (it is deleted)."""
    from saescale.app.job_paths import local_side_dir
    from saescale.app.run_identity import local_run_dir

    package = tmp_path / "ray" / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    package.mkdir(parents=True)
    monkeypatch.delenv("SAESCALE_RUNS", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(package)
    assert local_side_dir("run1") == str(tmp_path / "home" / ".cache" / "saescale" / "runs" / "run1")
    assert local_run_dir("s3://b/out", "run1").startswith(str(tmp_path / "home"))
    monkeypatch.setenv("SAESCALE_RUNS", "/srv/runs")  # an absolute choice is kept
    assert local_side_dir("run1") == "/srv/runs/run1"
    monkeypatch.chdir(tmp_path)  # outside a package: relative to where the job runs, as before
    monkeypatch.setenv("SAESCALE_RUNS", "runs")
    assert local_side_dir("run1") == str(tmp_path / "runs" / "run1")
    # a file:// output_dir is local: Hydra's files go beside it, never into a folder named "file:"
    assert local_run_dir(f"file://{tmp_path}/out", "run1") == f"{tmp_path}/out/hydra"


def test_the_default_lr_follows_the_runs_token_budget():
    """train.lr_rule=budget (the default): the paper's 2e-4/sqrt(N/2^14) times a multiple fitted
    to docs/paper's lr sweep, larger for short runs and more latents, never below 1x (a run long
    enough to converge keeps the paper's rule) nor above 16x; lr_rule=paper is that rule as is."""
    from saescale.app.train_job import engine_configs
    from saescale.core.config import budget_lr_multiplier

    def paper(n: int) -> float:
        return 2e-4 / (n / 2**14) ** 0.5

    short = TrainConfig(budget_tokens=400_000)
    assert short.resolved_lr(4096) == pytest.approx(paper(4096) * budget_lr_multiplier(400_000, 4096))
    assert 4 < budget_lr_multiplier(400_000, 4096) < 8  # where the sweep found the best NMSE
    assert budget_lr_multiplier(100_000, 4096) > budget_lr_multiplier(1_000_000, 4096)
    assert budget_lr_multiplier(400_000, 8192) > budget_lr_multiplier(400_000, 1024)
    assert TrainConfig(budget_tokens=10**10).resolved_lr(2**14) == pytest.approx(paper(2**14))  # converged: 1x
    assert budget_lr_multiplier(10, 2**24) == 16.0
    assert TrainConfig(budget_tokens=400_000, lr_rule="paper").resolved_lr(4096) == pytest.approx(paper(4096))
    assert TrainConfig().resolved_lr(4096) == pytest.approx(paper(4096))  # no budget known: the paper's
    assert TrainConfig(lr=1e-3, budget_tokens=400_000).resolved_lr(4096) == 1e-3
    with pytest.raises(ConfigError, match="train.lr_rule must be budget or paper"):
        TrainConfig(lr_rule="fast")
    # lr_scale multiplies either rule (the paper's lr sweeps run in multiples of it), not a set lr
    assert TrainConfig(budget_tokens=400_000, lr_scale=2).resolved_lr(4096) == pytest.approx(
        2 * short.resolved_lr(4096)
    )
    assert TrainConfig(lr_rule="paper", lr_scale=0.5).resolved_lr(4096) == pytest.approx(paper(4096) / 2)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="train.lr_scale must be a positive number"):
            TrainConfig(lr_scale=bad)
    with pytest.raises(ConfigError, match="with train.lr set, leave it at 1"):
        TrainConfig(lr=1e-3, lr_scale=2.0)
    # the job gives the engine the run's budget: steps x global batch
    job = OmegaConf.to_object(compose_job("train", "train.batch_size=512"))
    _, train = engine_configs(job, d_in=64, total_steps=100)
    assert (train.budget_tokens, train.lr_rule) == (51_200, "budget")


def test_the_model_stream_takes_the_cache_jobs_settings_and_defaults():
    """data.lm is the cache job's section minus what the train job sets itself: a streamed run
    and a cache built with the same values have the same windows and rows."""
    from saescale.data.builder import CacheConfig

    train = OmegaConf.to_object(compose_job("train", "data.source=model"))
    cache = OmegaConf.to_object(compose_job("cache"))
    lm = vars(train.data.lm)
    for f in dataclasses.fields(CacheConfig):
        if f.name in ("output", "num_workers", "use_ray", "storage_options", "skip_tokens"):
            assert f.name not in lm
        else:
            assert lm[f.name] == getattr(cache, f.name), f.name
