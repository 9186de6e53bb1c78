"""The memory planner: byte counts, refusals naming the knob, and its command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from saescale.distributed.plan import GiB, PlanError, check_fits, plan_memory


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
