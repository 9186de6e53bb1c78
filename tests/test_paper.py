"""The paper's experiments as sweeps (`saescale.sweeps.paper`, `jobs/paper.py`): the grids each
preset asks of the training job's launcher, and one real stage through that launcher (a local
Ray, one Ray Job per run) read back into report rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from saescale.sweeps.paper import (
    PRESETS,
    PaperError,
    Sweep,
    Sweeper,
    check_caches,
    frontier_grid_sweeps,
    frontier_lr_sweeps,
    report_rows,
    scaling_sweeps,
)
from saescale.sweeps.paper_report import progressive_section

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_each_preset_sweeps_the_grid_of_the_experiment_it_names():
    quick = PRESETS["quick"]
    # the scaling budgets grow with N: one sweep per budget, each the cartesian rest of the grid
    sweeps = scaling_sweeps(quick)
    assert [s.stage for s in sweeps] == ["scaling-e1", "scaling-e2"]
    assert sweeps[0].grid == (
        "sae.n_latents=512,1024,2048,4096",
        "train.epochs=1",
        "sae.k=16,32",
        "train.lr_scale=0.5,1,2",
        "train.seed=0",
    )
    assert sweeps[1].grid[0] == "sae.n_latents=8192" and sweeps[1].grid[1] == "train.epochs=2"
    # the frontier: an lr sweep at the middle of each grid, then each grid at its best multiple
    first = frontier_lr_sweeps(quick)
    assert first[0].grid == ("sae.architecture=topk,batchtopk", "sae.k=32", "train.lr_scale=0.5,1,2")
    assert "sae.l1_coef=0.002" in first[1].grid
    grids = {s.stage: s.grid for s in frontier_grid_sweeps(quick, {"topk": 1.0, "relu": 0.5})}
    assert grids["frontier-topk"] == ("sae.architecture=topk", "sae.k=8,16,32,64,128", "train.lr_scale=1")
    assert grids["frontier-relu"][-2:] == ("sae.l1_coef=0.0005,0.001,0.002,0.004,0.008", "train.lr_scale=0.5")


def test_missing_caches_and_failed_runs_stop_with_one_line(tmp_path):
    with pytest.raises(PaperError, match="no cache at runs/cache/smollm2-resid8-1m; build it: python jobs/cache.py"):
        os.makedirs(tmp_path / "runs/cache/smollm2-resid8")
        (tmp_path / "runs/cache/smollm2-resid8/manifest.json").write_text("{}")
        check_caches(str(tmp_path), ["scaling"])
    check_caches(str(tmp_path), ["lr", "frontier"])  # the small cache is all these need

    def fails(cmd, **_):  # a multirun that wrote no results (e.g. a bad override)
        return subprocess.CompletedProcess(cmd, 2)

    sweeper = Sweeper(ROOT, str(tmp_path), run=fails)
    with pytest.raises(PaperError, match=r"stage lr failed \(no runs finished\).*rerun to retry them"):
        sweeper.sweep(Sweep("lr", "lr", ("sae.n_latents=512",)))


@pytest.mark.slow
def test_a_stage_runs_as_ray_jobs_and_its_result_files_become_report_rows(tmp_path, small_cache):
    """The progressive experiment, shrunk: two real runs (TopK and Multi-TopK) through the
    training job's launcher on an embedded local Ray; their result.json files carry what the
    report needs (held-out NMSE at each test-time k, L0, dead fractions, the run's settings);
    a second pass skips both; the report's section is built from those rows alone."""
    env = dict(os.environ, SAESCALE_RUNS=str(tmp_path), RAY_DEDUP_LOGS="0")
    env.pop("RAY_ADDRESS", None)

    def run(cmd, **kwargs):
        return subprocess.run(cmd, env=env, timeout=600, **kwargs)

    sweeper = Sweeper(ROOT, str(tmp_path / "paper"), python=sys.executable, run=run)
    small = (
        f"data.cache={small_cache}",
        "sae.n_latents=256",
        "train.batch_size=256",
        "train.epochs=1",
        "train.log_every=4",  # the train counter's dead fraction comes from the last logged step
        "export.test_time_k=[8,32,128]",
    )
    stage = Sweep("progressive", "progressive", ("sae.multi_topk=false,true", *small))
    rows = sweeper.sweep(stage)
    assert sorted(r["multi_topk"] for r in rows) == [False, True]
    for row in rows:
        assert row["experiment"] == "progressive" and row["n"] == 256 and row["k"] == 32
        assert 0 < row["heldout_l0"] <= 32 and 0 < row["heldout_nmse"] < 1  # top-k, then ReLU
        assert row["nmse_at_k32"] == pytest.approx(row["heldout_nmse"], rel=1e-6)
        assert row["nmse_at_k8"] > row["nmse_at_k32"]  # fewer latents reconstruct worse
        assert row["lr_rule"] == "budget" and row["lr_mult"] == 1.0 and row["auxk"] and row["transpose_init"]
        assert row["tokens"] == row["steps"] * 256 > 0 and row["seconds"] > 0
        assert 0 <= row["heldout_dead_fraction"] <= 1 and row["train_dead_fraction"] is not None
        with open(os.path.join(row["output_dir"], "result.json")) as handle:
            assert json.load(handle)["data_wait_frac"] is not None  # a real Ray Train run wrote it
        assert os.listdir(row["sae"])  # the saved SAE that jobs/eval.py reads
    assert rows[0]["output_dir"].startswith(str(tmp_path / "paper" / "runs"))  # common.yaml's output_dir

    again = sweeper.sweep(stage)  # finished configs are skipped: the same rows, no new training
    assert {r["key"]: r["heldout_nmse"] for r in again} == {r["key"]: r["heldout_nmse"] for r in rows}
    results = pq.read_table(tmp_path / "paper" / "sweeps" / "progressive" / "results.parquet").to_pylist()
    assert [r["action"] for r in results] == ["skipped", "skipped"] and all(r["job_id"] is None for r in results)

    found = report_rows(PRESETS["quick"], sweeper)  # read back from the sweep folders alone
    assert sorted(r["key"] for r in found) == sorted(r["key"] for r in rows)
    (tmp_path / "report").mkdir()
    text = progressive_section(found, str(tmp_path / "report"))
    assert "Multi-TopK" in text and (tmp_path / "report" / "progressive.csv").exists()
