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


def test_scaling_fit_keeps_each_sizes_best_learning_rate(tmp_path):
    """An lr sweep per size: the fit uses each (N, k)'s lowest loss and says which lr it kept;
    the worse lrs (here 30% worse, and off the law) do not bend the fitted exponent."""
    from saescale.sweeps.report import fit_results

    n = np.repeat(2.0 ** np.arange(9, 15), 3)
    lr = np.tile([1e-3, 2e-3, 4e-3], 6)
    best = power_law(n, 0.05, 3.0, -0.3)
    loss = np.where(lr == 2e-3, best, best * 1.3 * (1 + 0.1 * np.log2(n)))
    results = {"n_latents": n, "k": np.full_like(n, 32), "lr": lr, "heldout_nmse": loss}
    fits = fit_results(results)
    assert (fits["runs"], fits["points"]) == (18, 6)
    assert all(p["lr"] == 2e-3 for p in fits["picked"])
    assert fits["L(N)"]["32"]["params"]["b"] == pytest.approx(-0.3, rel=0.05)


def test_paper_report_tables_from_runs(tmp_path):
    """docs/paper's report from run rows: the lr rule fitted back from best multiples
    planted on a known law, the frontier compared at matched L0, every section and plot written."""
    import json
    import math

    from saescale.sweeps.paper_report import write_report

    rows = []
    base = {"seconds": 1.0, "heldout_dead_fraction": 0.0, "train_dead_fraction": 0.0, "seed": 0, "epochs": 1}
    for n in (512, 2048, 8192):
        for tokens in (1e5, 1e6):
            best = (3e7 / tokens) ** 0.4 * (n / 2**14) ** 0.25  # the law the fit must recover
            for mult in (1, 2, 4, 8, 16, 32):
                nmse = 0.1 + 0.02 * math.log(mult / best) ** 2
                rows.append(
                    base
                    | {
                        "experiment": "lr",
                        "n": n,
                        "k": 32,
                        "tokens": int(tokens),
                        "lr_mult": mult,
                        "lr": mult,
                        "heldout_nmse": nmse,
                    }
                )
    for arch, l0s, scale in (("topk", (8, 16, 32, 64), 1.0), ("relu", (10, 40, 160), 1.5)):
        for i, l0 in enumerate(l0s):
            rows.append(
                base
                | {
                    "experiment": "frontier",
                    "architecture": arch,
                    "n": 4096,
                    "k": l0,
                    "l1": 0.001 * (i + 1) if arch == "relu" else 0.0,
                    "lr_mult": 1.0,
                    "lr": 1e-3,
                    "heldout_l0": float(l0),
                    "heldout_nmse": scale * 0.5 / l0**0.5,
                    "kl": scale * 0.1 / l0**0.5,
                }
            )
    text = write_report(rows, str(tmp_path), "test")
    fit_line = next(line for line in text.splitlines() if line.startswith("Least-squares fit"))
    assert "^0.400" in fit_line and "^0.250" in fit_line
    assert (tmp_path / "lr.png").exists() and (tmp_path / "frontier_nmse.png").exists()
    matched = [line for line in text.splitlines() if line.startswith("| 16 |")][0].split("|")
    assert float(matched[2]) == pytest.approx(0.125, rel=1e-3)  # TopK at L0 16
    assert matched[3].strip() == "–"  # no BatchTopK runs
    assert float(matched[4]) == pytest.approx(1.5 * 0.125, rel=1e-3)  # ReLU interpolated at L0 16
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == len(rows)
    json.loads((tmp_path / "runs.jsonl").read_text().splitlines()[0])
