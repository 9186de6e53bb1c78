"""The benchmarks' precision and micro-batch reports, at tiny sizes (each runs the real CLI)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

TINY = ["--d-in", "32", "--n-latents", "1024", "--k", "8", "--batch", "256"]


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    # a CUDA-free child whatever this process set (tests/test_triton_kernels.py sets
    # TRITON_INTERPRET=1 in the worker that imports it)
    child_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-m", "saescale.cli", "bench", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**child_env, **env},
    )


def _json(out: subprocess.CompletedProcess[str]) -> dict:
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bench_step_reports_precision_micro_batches_and_both_floors(precision):
    quick = ["--repeats", "2", "--warmup", "1", "--no-naive", "--micro-batches", "2"]
    result = _json(_cli("step", *TINY, *quick, "--precision", precision))
    assert result["precision"] == precision
    assert result["micro_batches"] == 2
    for key in ("step_s", "floor_s", "floor_fp32_s", "step_over_floor", "step_over_fp32_floor", "preact_mb"):
        assert result[key] > 0, key
    # the encoder GEMM's rate against a large square GEMM's, in the step's dtype
    assert result["gemm_tflops"] > 0 and result["square_gemm_tflops"] > 0
    assert (
        result["gemm_fraction_of_peak"] == round(result["gemm_tflops"] / result["square_gemm_tflops"], 3)
        or abs(result["gemm_fraction_of_peak"] - result["gemm_tflops"] / result["square_gemm_tflops"]) < 0.01
    )
    # one micro-batch's pre-activation: 128 rows x 1024 latents in the compute dtype
    assert result["preact_mb"] == round(128 * 1024 * (4 if precision == "fp32" else 2) / 2**20, 1)
    if precision == "fp32":
        assert result["floor_fp32_s"] == result["floor_s"]
    else:  # the float32 floor was timed in its own phase, after the peak was taken
        assert len(result["fp32_floor_times_s"]) == 2


def test_bench_step_counts_host_syncs_and_runs_the_sync_free_step_on_request():
    quick = ["--repeats", "2", "--warmup", "1", "--no-naive", "--dead-fraction", "0.02"]
    on = _json(_cli("step", *TINY, *quick, "--sync-free", "on"))
    off = _json(_cli("step", *TINY, *quick))  # auto: the synchronising step on a CPU
    assert on["sync_free"] and on["host_syncs_per_step"] == 0 and on["aux_path"] == "fixed_block"
    assert not off["sync_free"] and off["host_syncs_per_step"] > 0 and off["host_sync_ops"]["aten.nonzero"] >= 1
    assert on["kernels"] == off["kernels"] == "torch"


def test_bench_kernels_compares_each_product_with_triton_interpreted_on_cpu():
    tiny = ["--d-in", "40", "--n-latents", "256", "--k", "4", "--batch", "16", "--repeats", "1", "--warmup", "0"]
    result = _json(_cli("kernels", *tiny, "--device", "cpu", TRITON_INTERPRET="1"))
    assert result["triton"] == "interpreted (not a timing)"
    for name in ("decode", "values_grad", "rows_by_latent", "rows_by_latent_accumulate"):
        line = result["products"][name]
        assert line["torch_s"] > 0 and line["triton_s"] > 0 and line["triton_over_torch"] > 0
        assert line["triton_max_rel_diff"] < 1e-5, name  # the same numbers
    assert result["products"]["rows_by_latent"]["torch_whole_max_rel_diff"] < 1e-6
    # without the interpreter a CPU run times torch alone and says why
    plain = _json(_cli("kernels", *tiny, "--device", "cpu"))
    assert "CUDA" in plain["triton"] and "triton_s" not in plain["products"]["decode"]


def test_bench_step_rejects_micro_batches_larger_than_the_batch():
    out = _cli("step", *TINY, "--no-naive", "--micro-batches", "512")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "saescale: error: --micro-batches must be between 1 and --batch (256), got 512"
    ]


def test_bench_precision_reports_a_finite_drift():
    tiny = ["--d-in", "16", "--n-latents", "256", "--k", "4", "--batch", "128", "--steps", "10"]
    result = _json(_cli("precision", *tiny, "--n-atoms", "64", "--active", "2", "--precision", "bf16"))
    assert set(result["runs"]) == {"fp32", "bf16"}
    assert math.isfinite(result["nmse_drift"]["bf16"])
    for run in result["runs"].values():
        assert 0 < run["heldout_nmse"] < 2 and run["step_s"] > 0


def test_bench_dist_peak_memory_plans_the_precision_and_micro_batches_it_runs():
    tiny = ["--d-in", "16", "--n-latents", "512", "--k", "4", "--batch", "64", "--tp", "2", "--repeats", "1"]
    result = _json(_cli("dist", "--peak-memory", *tiny, "--precision", "bf16", "--micro-batches", "2"))
    assert (result["precision"], result["micro_batches"]) == ("bf16", 2)
    assert result["peak_over_plan"] > 0
    # a layout the planner rejects is refused before any rank starts
    bad = _cli("dist", "--peak-memory", *tiny, "--micro-batches", "3")
    assert bad.returncode == 2
    assert bad.stderr.strip() == "saescale: error: batch=64 must divide into dp=1 groups x micro_batches=3"


def test_bench_checkpoint_times_both_ways_of_writing_the_same_files():
    from saescale.bench.checkpoint import bench_checkpoint

    r = bench_checkpoint(d_in=32, n_latents=512, k=8, batch=64, steps=2)
    # W_enc, W_dec and their two Adam moments dominate; both ways wrote the same files
    assert r["checkpoint_bytes"] > 3 * (2 * 512 * 32 * 4)
    assert r["sync_stall_s"] > 0 and r["background_stall_s"] > 0 and r["background_write_s"] > 0
    assert r["ratio"] == pytest.approx(r["background_cost_s"] / r["sync_cost_s"])


def test_bench_step_times_the_peers_own_steps_beside_ours():
    """`--peers sparsify,saelens`: each peer's own training step (its SAE class, its default
    optimiser), timed in its own child on the same batch, reported against saescale's step."""
    quick = ("--repeats", "2", "--warmup", "1", "--no-naive", "--dead-fraction", "0.1")
    result = _json(_cli("step", *TINY, *quick, "--peers", "sparsify,saelens"))
    for peer in ("sparsify", "saelens"):
        theirs = result["peers"][peer]
        assert theirs["step_s"] > 0 and len(theirs["times_s"]) == 2
        assert theirs["peer_over_step"] == pytest.approx(theirs["step_s"] / result["step_s"], rel=0.05)
    out = _cli("step", *TINY, "--no-naive", "--peers", "sparsify,nobody")
    assert out.returncode == 2 and "--peers: unknown nobody; choose from sparsify, saelens" in out.stderr


def test_bench_stream_sizes_the_lm_actors_from_both_measured_rates(tiny_model_dir):
    result = _json(
        _cli(
            "stream",
            "--model",
            tiny_model_dir,
            "--layer",
            "1",
            "--n-latents",
            "1024",
            "--k",
            "8",
            "--batch-per-worker",
            "256",
            "--windows-per-batch",
            "4",
            "--chunks",
            "2",
        )
    )
    lm, sae = result["lm_tokens_per_s_per_actor"], result["sae_tokens_per_s_per_worker"]
    assert lm > 0 and sae > 0 and len(result["lm_chunk_s"]) == 2
    actors = result["lm_actors_per_worker"]
    assert actors == max(1, math.ceil(0.95 * sae / lm))
    waits = result["predicted_data_wait"]
    assert waits[str(actors)] <= 0.05 and waits["1"] == round(max(0.0, 1 - lm / sae), 3)
