"""`saescale scaling fit <results>`: fit the scaling laws to a sweep's results table, print the
parameters with their standard errors, write them as JSON and plot the data against the fits.

The results table (Parquet or CSV) has one row per finished run with at least `n_latents`, `k`
and the loss column (default `heldout_nmse`); where a sweep tried several runs per (n_latents, k)
(an lr sweep, seeds), each size's lowest-loss run is the one fitted, and `fits.json` says which
(with its `lr` when the table has that column); `compute` (training FLOPs) enables L(C), and
`tokens_to_convergence` enables T(N). Rows whose `status` is not "finished" are ignored.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from saescale.sweeps.scaling import (
    Fit,
    FitError,
    fit_joint_law,
    fit_power_law,
    fit_tokens_to_convergence,
    joint_law,
    power_law,
)


def read_results(path: str) -> dict[str, np.ndarray]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pacsv.read_csv(path) if path.endswith(".csv") else pq.read_table(path)
    columns = {name: np.asarray(table.column(name).to_pylist()) for name in table.column_names}
    if "status" in columns:
        keep = columns["status"] == "finished"
        columns = {k: v[keep] for k, v in columns.items()}
    return columns


def best_per_size(results: dict[str, np.ndarray], loss: str = "heldout_nmse") -> dict[str, np.ndarray]:
    """The lowest-loss row of each (n_latents, k): a sweep that tried several learning rates (or
    seeds) per size is fitted on each size's best run, as the paper tunes lr per size."""
    n, k, y = (results[c].astype(np.float64) for c in ("n_latents", "k", loss))
    keep: dict[tuple[float, float], int] = {}
    for i in range(len(y)):
        if np.isfinite(y[i]) and ((n[i], k[i]) not in keep or y[i] < y[keep[(n[i], k[i])]]):
            keep[(n[i], k[i])] = i
    rows = np.asarray(sorted(keep.values()), dtype=np.int64)
    return {name: column[rows] for name, column in results.items()}


def fit_results(results: dict[str, np.ndarray], loss: str = "heldout_nmse") -> dict[str, Any]:
    """Every law the columns allow, on each (n_latents, k)'s best run; a law that cannot be fitted
    is reported with its reason."""
    for column in ("n_latents", "k", loss):
        if column not in results:
            raise FitError(f"the results table has no column {column!r}")
    runs = len(results[loss])
    results = best_per_size(results, loss)
    n, k, y = (results[c].astype(np.float64) for c in ("n_latents", "k", loss))
    out: dict[str, Any] = {"loss": loss, "points": int(len(y)), "runs": runs, "L(N)": {}, "errors": {}}
    if "lr" in results:  # which run each size kept
        out["picked"] = [
            {"n_latents": int(a), "k": int(b), "lr": float(c), loss: float(d)}
            for a, b, c, d in zip(n, k, results["lr"].astype(np.float64), y)
        ]
    for kv in sorted(set(k.tolist())):
        sel = k == kv
        try:
            out["L(N)"][str(int(kv))] = fit_power_law(n[sel], y[sel]).to_dict()
        except FitError as exc:
            out["errors"][f"L(N) at k={int(kv)}"] = str(exc)
    for key, fn, args in (
        ("L(N,k)", fit_joint_law, (n, k, y)),
        ("L(C)", fit_power_law, (results.get("compute"), y, "L(C) = e + a C^b")),
        ("T(N)", fit_tokens_to_convergence, (n, results.get("tokens_to_convergence"))),
    ):
        if any(a is None for a in args):
            continue
        try:
            out[key] = fn(*[np.asarray(a, dtype=np.float64) if not isinstance(a, str) else a for a in args]).to_dict()
        except FitError as exc:
            out["errors"][key] = str(exc)
    return out


def _save(fig, out_dir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_fits(results: dict[str, np.ndarray], fits: dict[str, Any], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    loss = fits["loss"]
    n, k, y = (results[c].astype(np.float64) for c in ("n_latents", "k", loss))
    grid = np.geomspace(n.min(), n.max(), 100)
    written = []
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, kv in enumerate(sorted(set(k.tolist()))):
        color = f"C{i}"
        sel = k == kv
        ax.scatter(n[sel], y[sel], color=color, label=f"k={int(kv)}")
        if str(int(kv)) in fits["L(N)"]:
            p = fits["L(N)"][str(int(kv))]["params"]
            ax.plot(grid, power_law(grid, p["e"], p["a"], p["b"]), color=color, lw=1)
        if "L(N,k)" in fits:
            ax.plot(
                grid,
                joint_law(np.vstack([grid, np.full_like(grid, kv)]), **fits["L(N,k)"]["params"]),
                color=color,
                lw=1,
                ls="--",
            )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="latents N",
        ylabel=loss,
        title="solid: L(N) = e + a N^b per k; dashed: joint L(N, k)",
    )
    ax.legend(fontsize=8)
    written.append(_save(fig, out_dir, "loss_vs_latents.png"))
    if "L(C)" in fits:
        c = results["compute"].astype(np.float64)
        fig, ax = plt.subplots(figsize=(6, 4.5))
        ax.scatter(c, y)
        cg = np.geomspace(c.min(), c.max(), 100)
        p = fits["L(C)"]["params"]
        ax.plot(cg, power_law(cg, p["e"], p["a"], p["b"]), lw=1)
        ax.set(xscale="log", yscale="log", xlabel="training compute (FLOPs)", ylabel=loss, title="L(C) = e + a C^b")
        written.append(_save(fig, out_dir, "loss_vs_compute.png"))
    if "T(N)" in fits:
        t = results["tokens_to_convergence"].astype(np.float64)
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for i, kv in enumerate(sorted(set(k.tolist()))):
            ax.scatter(n[k == kv], t[k == kv], color=f"C{i}", label=f"k={int(kv)}")
        p = fits["T(N)"]["params"]
        ax.plot(grid, np.exp(p["log_c"] + p["p"] * np.log(grid)), color="k", lw=1, label=f"c N^{p['p']:.2f}")
        ax.set(xscale="log", yscale="log", xlabel="latents N", ylabel="tokens to convergence", title="T(N) = c N^p")
        ax.legend(fontsize=8)
        written.append(_save(fig, out_dir, "tokens_to_convergence.png"))
    return written


def run(path: str, loss: str, out_dir: str) -> dict[str, Any]:
    results = read_results(path)
    fits = fit_results(results, loss)
    results = best_per_size(results, loss)  # the plots show the fitted points
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "fits.json"), "w") as handle:
        json.dump(fits, handle, indent=2)
    fits["plots"] = plot_fits(results, fits, out_dir)
    for key in ("L(N,k)", "L(C)", "T(N)"):
        if key in fits:
            print(Fit(**fits[key]).describe())
    for kv, fit in fits["L(N)"].items():
        print(f"k={kv}: " + Fit(**fit).describe())
    if fits["runs"] > fits["points"]:
        print(f"{fits['runs']} runs, fitted on the best of each (N, k): {fits['points']} points")
        for pick in fits.get("picked", []):
            print(f"  N={pick['n_latents']} k={pick['k']}: lr {pick['lr']:.3g}, {loss} {pick[loss]:.4f}")
    for key, why in fits["errors"].items():
        print(f"{key}: not fitted: {why}")
    return fits
