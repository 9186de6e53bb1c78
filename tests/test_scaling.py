"""The scaling-law fits recover the parameters of synthetic data generated from each law."""

from __future__ import annotations

import numpy as np
import pytest

from saescale.sweeps.scaling import (
    FitError,
    fit_joint_law,
    fit_power_law,
    fit_tokens_to_convergence,
    joint_law,
    power_law,
    tokens_to_convergence,
)


def _noisy(values: np.ndarray, rel: float, seed: int) -> np.ndarray:
    return values * np.exp(np.random.default_rng(seed).normal(0.0, rel, size=values.shape))


def test_power_law_with_irreducible_term_is_recovered():
    n = 2.0 ** np.arange(10, 22)
    truth = {"e": 0.05, "a": 3.0, "b": -0.3}
    fit = fit_power_law(n, _noisy(power_law(n, **truth), 0.003, 0))
    for name, value in truth.items():
        assert fit.params[name] == pytest.approx(value, rel=0.10), (name, fit.describe())
    assert fit.r2_log > 0.99 and all(np.isfinite(list(fit.stderr.values())))


def test_joint_law_is_recovered():
    n, k = np.meshgrid(2.0 ** np.arange(11, 19), 2.0 ** np.arange(3, 8))
    n, k = n.ravel(), k.ravel()
    truth = {"a": 1.0, "b_k": -0.6, "b_N": -0.25, "g": 0.02, "z": -3.0, "h": -0.4}
    fit = fit_joint_law(n, k, _noisy(joint_law(np.vstack([n, k]), **truth), 0.002, 1))
    for name, value in truth.items():
        assert fit.params[name] == pytest.approx(value, rel=0.10), (name, fit.describe())
    assert fit.r2_log > 0.99


def test_tokens_to_convergence_is_recovered():
    n = 2.0 ** np.arange(10, 20)
    fit = fit_tokens_to_convergence(n, _noisy(np.exp(2.0) * n**0.6, 0.01, 2))
    assert fit.params["p"] == pytest.approx(0.6, rel=0.10)
    assert fit.params["log_c"] == pytest.approx(2.0, rel=0.10)


def test_too_few_points_is_a_clear_error():
    with pytest.raises(FitError, match="3 parameters but only 3 points"):
        fit_power_law([1e3, 1e4, 1e5], [1.0, 0.5, 0.3])
    with pytest.raises(FitError, match="positive and finite"):
        fit_power_law([1e3, 1e4, 1e5, 1e6], [1.0, 0.5, float("nan"), 0.2])


def test_scaling_fit_command_writes_fits_and_plots(tmp_path):
    import json
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    n, k = np.meshgrid(2.0 ** np.arange(11, 16), 2.0 ** np.arange(3, 6))
    n, k = n.ravel(), k.ravel()
    loss = _noisy(joint_law(np.vstack([n, k]), 1.0, -0.6, -0.25, 0.02, -3.0, -0.4), 0.002, 3)
    status = ["finished"] * (len(n) - 1) + ["failed"]
    pq.write_table(
        pa.table(
            {
                "n_latents": n.astype(int),
                "k": k.astype(int),
                "heldout_nmse": loss,
                "compute": 6.0 * n * 1e6,
                "status": status,
            }
        ),
        tmp_path / "results.parquet",
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "saescale.cli",
            "scaling",
            "fit",
            str(tmp_path / "results.parquet"),
            "--out",
            str(tmp_path / "fit"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    fits = json.loads((tmp_path / "fit" / "fits.json").read_text())
    assert fits["points"] == len(n) - 1  # the failed run is left out
    assert fits["L(N,k)"]["r2_log"] > 0.99 and set(fits["L(N)"]) == {"8", "16", "32"}
    assert "L(C)" in fits and "b_N" in proc.stdout
    assert (tmp_path / "fit" / "loss_vs_latents.png").stat().st_size > 1000
    assert (tmp_path / "fit" / "loss_vs_compute.png").exists()


def test_tokens_to_convergence_of_a_curve_is_where_it_flattens():
    tokens = np.arange(1, 201) * 1000.0
    # exponential decay to 0.2 with time constant 20k tokens: within 5% of the final value
    # once 0.8 exp(-t/20k) <= 0.01, i.e. t >= 20k ln 80 = 87.6k tokens
    loss = 0.2 + 0.8 * np.exp(-tokens / 20000.0)
    assert tokens_to_convergence(tokens, loss, tol=0.05, window=1) == pytest.approx(88000.0)
    # a one-point spike later on moves the answer past the spike; smoothing damps it
    spiky = loss.copy()
    spiky[150] = 0.5
    assert tokens_to_convergence(tokens, spiky, tol=0.05, window=1) == 152000.0
    with pytest.raises(ValueError, match="matching"):
        tokens_to_convergence(tokens, loss[:-1])
