"""The memory planner: byte counts, refusals naming the knob, and its command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from saescale.distributed.plan import (
    CPU_LOWP_GEMM_ELEMS,
    RUNTIME_SLACK_BYTES,
    DoesNotFit,
    GiB,
    PlanError,
    auto_micro_batches,
    check_fits,
    fewest_workers,
    plan_memory,
)

GPT4 = dict(n_latents=16_777_216, d_model=4096, k=32, batch=131072)  # conf/experiment/gpt4_16m.yaml


def test_gpt4_16m_state_is_2_tib_in_total():
    plan = plan_memory(16_777_216, 4096, 256, workers=64, tp=16, batch=131072)
    state = plan.weights + plan.grads + plan.adam
    assert state * plan.tp == pytest.approx(2 * 1024 * GiB, rel=1e-3)  # the "about 2 TB"
    assert plan.preact == (131072 // 4) * (16_777_216 // 16) * 4
    with pytest.raises(PlanError, match="raise tp"):
        check_fits(plan)


def test_micro_batching_is_the_knob_when_the_preactivation_dominates():
    plan = plan_memory(2**20, 4096, 256, workers=8, tp=8, batch=131072, device_gib=80)
    with pytest.raises(PlanError, match="raise micro_batches"):
        check_fits(plan)
    fixed = plan_memory(2**20, 4096, 256, workers=8, tp=8, batch=131072, micro_batches=8, device_gib=80)
    check_fits(fixed)
    assert fixed.preact == plan.preact // 8


@pytest.mark.parametrize(
    "kwargs,match", [(dict(workers=6, tp=4), "multiple of tp"), (dict(workers=4, tp=3), "multiple of tp")]
)
def test_bad_layouts(kwargs, match):
    with pytest.raises(PlanError, match=match):
        plan_memory(2**16, 576, 32, batch=4096, **kwargs)


def test_plan_cli_json_and_exit_codes():
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "saescale.cli",
            "plan",
            "--n-latents",
            "524288",
            "--d-model",
            "576",
            "--workers",
            "2",
            "--tp",
            "2",
            "--batch",
            "4096",
            "--device-gib",
            "24",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    plan = json.loads(ok.stdout)
    assert plan["fits"] and plan["n_local"] == 262144
    # what checkpoint_every=auto will about choose: weights + Adam per rank, copied aside at 5 GB/s
    ckpt = plan["checkpoint"]
    assert ckpt["bytes_per_rank"] == plan["weights"] + plan["adam"] + plan["ema"]
    assert ckpt["stall_s"] == pytest.approx(ckpt["bytes_per_rank"] / 5e9)
    assert ckpt["interval_s"] == pytest.approx(max((2 * ckpt["stall_s"] * 86400) ** 0.5, ckpt["upload_s"]))
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "saescale.cli",
            "plan",
            "--n-latents",
            "16777216",
            "--d-model",
            "4096",
            "--workers",
            "64",
            "--tp",
            "16",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and "raise tp" in bad.stderr


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "saescale.cli", "plan", *args], capture_output=True, text=True, timeout=120
    )


def test_bf16_halves_the_preactivation_and_counts_the_low_precision_encoder_copy():
    n, d, k, tp, batch, m = 2**20, 1024, 32, 4, 8192, 2
    fp32 = plan_memory(n, d, k, workers=8, tp=tp, batch=batch, micro_batches=m)
    bf16 = plan_memory(n, d, k, workers=8, tp=tp, batch=batch, micro_batches=m, precision="bf16")
    n_local, rows = n // tp, batch // 2
    micro = rows // m
    assert fp32.precision == "fp32" and bf16.precision == "bf16"
    assert fp32.preact == micro * n_local * 4 and bf16.preact * 2 == fp32.preact
    assert fp32.lowp == 0 and bf16.lowp == n_local * d * 2 + n_local * 2
    assert bf16.weights == fp32.weights and bf16.adam == fp32.adam  # master state stays float32
    # everything after the selection runs on the whole batch: eight [rows, d] and the TP gather
    fp32_buffers = 8 * rows * d * 4 + 2 * rows * tp * k * 12 + RUNTIME_SLACK_BYTES
    assert fp32.buffers == fp32_buffers
    # the bf16 GEMM's k + max(8, k/4) candidates, and one block of a CPU GEMM's float32 temporary
    assert bf16.buffers == fp32_buffers + micro * (k + 8) * (2 + 8) + min(micro * n_local, CPU_LOWP_GEMM_ELEMS) * 4
    k_aux = 512  # the SAE config's default at d=1024
    assert fp32.auxk == 2 * micro * tp * k_aux * 12 + rows * (k_aux // tp) * 40
    assert bf16.total == 4 * bf16.weights + bf16.lowp + bf16.preact + bf16.buffers + bf16.auxk
    fp16 = plan_memory(n, d, k, workers=8, tp=tp, batch=batch, micro_batches=m, precision="fp16")
    assert fp16.total == bf16.total
    one = plan_memory(n, d, k, workers=8, tp=tp, batch=batch, micro_batches=1)
    assert one.buffers == fp32.buffers and one.auxk > fp32.auxk  # AuxK's candidate gather is per micro-batch
    assert "precision=bf16" in bf16.table() and "low-prec W_enc" in bf16.table()
    with pytest.raises(PlanError, match="resolve 'auto'"):
        plan_memory(n, d, k, workers=8, tp=tp, batch=batch, precision="auto")


def test_auto_micro_batches_picks_the_fewest_that_fit():
    plan = plan_memory(**GPT4, workers=64, tp=64, micro_batches="auto", ema=True, precision="bf16")
    assert plan.fits and plan.micro_batches == 32
    assert not plan_memory(**GPT4, workers=64, tp=64, micro_batches=16, ema=True, precision="bf16").fits
    assert auto_micro_batches(**GPT4, workers=64, tp=64, ema=True, precision="bf16") == plan
    fp32 = auto_micro_batches(**GPT4, workers=128, tp=64, ema=True, precision="fp32")
    assert fp32.micro_batches == 16 and fp32.dp == 2  # fp32: a second replica (half the rows each)


def test_auto_micro_batches_refuses_naming_the_knob():
    # the state fits; the three [batch, d] float32 buffers (12 GiB) do not, at any micro-batch count
    with pytest.raises(DoesNotFit, match="raise the workers") as caught:
        plan_memory(2**14, 4096, 32, workers=1, tp=1, batch=2**18, micro_batches="auto", device_gib=10)
    assert caught.value.plan.micro_batches == 64 and not caught.value.plan.fits
    with pytest.raises(DoesNotFit, match="raise tp"):
        plan_memory(**GPT4, workers=16, tp=16, micro_batches="auto", precision="bf16")


def test_fewest_workers_for_the_gpt4_16m_sae():
    # By hand, per rank at tp: float32 weights+grads+Adam (+EMA) are 32 (40) bytes per latent per
    # d_model, the bf16 W_enc copy 2 more: 2^24 * 4096 * 42 B = 2688 GiB with EMA -> tp=32 holds
    # 84 GiB > 80, tp=64 holds 42 GiB. Without EMA 2176 GiB -> tp=32 holds 68 GiB, and the
    # whole-batch buffers at dp=1 (eight [131072, 4096] float32 = 16 GiB) already exceed the rest.
    # At tp=64, dp=1: 42 (34 without EMA) + 22 GiB of buffers + AuxK's worst case 12 GiB + a
    # 4096-row bf16 pre-activation 2 GiB: 78.3 (70.3) GiB at 32 micro-batches; 16 do not fit.
    ema = fewest_workers(**GPT4, ema=True, precision="bf16", device_gib=80)
    assert (ema.workers, ema.tp, ema.dp, ema.micro_batches) == (64, 64, 1, 32)
    assert ema.total / GiB == pytest.approx(78.29, abs=0.01)
    plain = fewest_workers(**GPT4, ema=False, precision="bf16", device_gib=80)
    assert (plain.workers, plain.tp, plain.dp, plain.micro_batches) == (64, 64, 1, 32)
    assert plain.fits and not plan_memory(**GPT4, workers=32, tp=32, micro_batches=64, precision="bf16").fits
    with pytest.raises(DoesNotFit, match="no layout"):
        fewest_workers(**GPT4, ema=True, precision="bf16", device_gib=0.5, max_micro_batches=4)


def test_plan_cli_auto_micro_batches_and_fewest_workers():
    gpt4 = ["--n-latents", "16777216", "--d-model", "4096", "--k", "32", "--batch", "131072", "--precision", "bf16"]
    auto = _cli(*gpt4, "--workers", "64", "--tp", "64", "--ema", "--micro-batches", "auto", "--json")
    assert auto.returncode == 0, auto.stderr
    assert json.loads(auto.stdout)["micro_batches"] == 32 and json.loads(auto.stdout)["precision"] == "bf16"
    fewest = _cli(*gpt4, "--ema", "--fewest-workers", "--json")
    assert fewest.returncode == 0, fewest.stderr
    assert {k: json.loads(fewest.stdout)[k] for k in ("workers", "tp", "micro_batches")} == {
        "workers": 64,
        "tp": 64,
        "micro_batches": 32,
    }
    table = _cli(*gpt4, "--fewest-workers")
    assert table.returncode == 0 and "workers=64 tp=64" in table.stdout and "auxk (worst)" in table.stdout
    too_big = _cli(*gpt4, "--workers", "1", "--tp", "1", "--micro-batches", "auto", "--json")
    assert too_big.returncode == 1 and "raise tp" in too_big.stderr
    assert not json.loads(too_big.stdout)["fits"]
    none = _cli(*gpt4, "--fewest-workers", "--device-gib", "0.5", "--max-micro-batches", "4")
    assert none.returncode == 1 and "no layout" in none.stderr
    for bad, message in [
        ((), "--workers and --tp are required"),
        (("--fewest-workers", "--tp", "8"), "drop them"),
        (("--workers", "8", "--tp", "8", "--micro-batches", "some"), "positive integer or 'auto'"),
    ]:
        result = _cli(*gpt4, *bad)
        assert result.returncode == 2 and message in result.stderr, result.stderr


def test_checkpoint_interval_grows_with_the_state_and_the_mtbf():
    from saescale.distributed.plan import plan_checkpoints, plan_memory, young_daly_interval_s

    small, large = (plan_memory(n, 576, 32, 2, 2, 4096) for n in (2**16, 2**20))
    assert plan_checkpoints(large, 3600).interval_s > plan_checkpoints(small, 3600).interval_s
    assert plan_checkpoints(small, 86400).interval_s > plan_checkpoints(small, 60).interval_s
    # a slow store: the interval is at least one upload (one checkpoint in flight)
    slow = plan_checkpoints(large, 60, upload_gb_s=0.001)
    assert slow.interval_s == slow.upload_s > young_daly_interval_s(slow.stall_s, 60)
    assert "checkpoint_every=auto" in slow.line()


def test_what_the_data_iterators_hold_counts_in_the_plan():
    """`data_bytes` (a rank's streams' shuffle buffers and prefetched batches, from the job) is a
    line of the table and part of the total, and auto micro-batching makes room for it."""
    base = plan_memory(2**16, 576, 32, workers=1, tp=1, batch=4096)
    held = plan_memory(2**16, 576, 32, workers=1, tp=1, batch=4096, data_bytes=3 * GiB)
    assert held.total - base.total == 3 * GiB and held.data == 3 * GiB
    assert any(line.split()[:1] == ["data"] and float(line.split()[1]) == 3.0 for line in held.table().splitlines())
    device = (base.total + 2.6 * GiB) / GiB  # the data does not fit beside one micro-batch's 1 GiB pre-activation
    assert not plan_memory(2**16, 576, 32, workers=1, tp=1, batch=4096, device_gib=device, data_bytes=3 * GiB).fits
    auto = plan_memory(
        2**16, 576, 32, workers=1, tp=1, batch=4096, micro_batches="auto", device_gib=device, data_bytes=3 * GiB
    )
    assert auto.fits and auto.micro_batches > 1
