"""Tables and plots of the paper's runs (`sweeps.paper.report_rows`: one row per run's result.json) for docs/paper/.

One function per experiment; each returns the markdown of its section and writes its CSV and
PNG beside it. The scaling section goes through `saescale scaling fit` (`sweeps.report.run`) on
a results table written here, so the figure's command is the one a user runs on their own sweep.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

from saescale.sweeps.scaling import FLOPS_PER_TOKEN_DN

# what the paper reports (GPT-4 SAEs; the joint law's constants are recalled, not verified)
PAPER_EXPONENTS = (
    "joint L(N, k) on GPT-4: b_N = -0.017, g = -0.042, an effective N-exponent of about -0.16 at k = 32 "
    "(constants unverified); L(C) = 0.09 + 0.056 C^-0.084; its L(N) exponents at fixed k were not recovered"
)

Row = dict[str, Any]


def _by(rows: list[Row], experiment: str) -> list[Row]:
    return [r for r in rows if r["experiment"] == experiment]


def _write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    columns = list(dict.fromkeys(c for row in rows for c in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)


def _table(header: list[str], body: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "–" if not math.isfinite(v) else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in body]
    return "\n".join(lines)


def _plot(path: str, draw: Callable[[Any], None], size: tuple[float, float] = (6.0, 4.2)) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    draw(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _minutes(rows: list[Row]) -> float:
    return sum(r["seconds"] for r in rows) / 60


# ------------------------------------------------------------------------------------- lr
def lr_section(rows: list[Row], out: str) -> tuple[str, dict[str, float] | None]:
    """NMSE against the lr multiple per (N, tokens), the best multiple of each, and the budget
    rule fitted to them: best multiple = (T_ref / T) ** beta (N drops out when the paper's
    1/sqrt(N) already holds)."""
    runs = _by(rows, "lr")
    if not runs:
        return "", None
    groups: dict[tuple[int, int], list[Row]] = defaultdict(list)
    for r in runs:
        groups[(r["n"], r["tokens"])].append(r)
    mults = sorted({r["lr_mult"] for r in runs})
    body, best_points = [], []
    for (n, tokens), group in sorted(groups.items()):
        by_mult = {r["lr_mult"]: r["heldout_nmse"] for r in group}
        top = min(group, key=lambda r: r["heldout_nmse"])
        body.append([n, tokens, *[by_mult.get(m, float("nan")) for m in mults], f"{top['lr_mult']:g}x"])
        best_points.append((n, tokens, _refined_best(by_mult)))
    _write_csv(
        os.path.join(out, "lr.csv"), [{k: r[k] for k in ("n", "tokens", "lr_mult", "lr", "heldout_nmse")} for r in runs]
    )
    fit = _fit_budget_rule(best_points)

    def draw(ax: Any) -> None:
        for (n, t), group in sorted(groups.items()):
            group = sorted(group, key=lambda r: r["lr_mult"])
            ax.plot(
                [r["lr_mult"] for r in group],
                [r["heldout_nmse"] for r in group],
                "o-",
                label=f"N={n}, {t / 1e3:.0f}k tokens",
            )
        ax.set(
            xscale="log",
            xlabel="lr / paper rule (2e-4/sqrt(N/2^14))",
            ylabel="held-out NMSE",
            title="lr sweep (TopK k=32)",
        )
        ax.legend(fontsize=7)

    _plot(os.path.join(out, "lr.png"), draw)
    text = [
        "## Learning rate against the token budget (`--only lr`)",
        "",
        "Held-out NMSE of TopK (k=32) against the lr, as a multiple of the paper's rule 2e-4/sqrt(N/2^14), per "
        "size and token budget. The best multiple (refined by a parabola through the best three points in log lr) "
        "is the data behind the default `train.lr_rule=budget`.",
        "",
        _table(["N", "tokens", *[f"{m:g}x" for m in mults], "best"], body),
        "",
        "![lr sweep](lr.png)",
        "",
    ]
    if fit is not None:
        text += [
            f"Least-squares fit of log(best multiple) over these {fit['points']} points: multiple = "
            f"(T_ref / T)^{fit['token_exponent']:.3f} x (N / 2^14)^{fit['n_exponent']:.3f} with T_ref = "
            f"{fit['ref_tokens']:.4g} tokens (rms error {fit['rms_log']:.2f} in log). `saescale.core.config` "
            "holds these constants (rounded); the multiple is clipped to [1, 16].",
            "",
        ]
    text.append(f"{len(runs)} runs, {_minutes(runs):.1f} min of training.")
    return "\n".join(text) + "\n", fit


def _fit_budget_rule(points: list[tuple[int, int, float]]) -> dict[str, float] | None:
    """log(best multiple) = c + a log(N / 2^14) - beta log(T), least squares; needs two budgets."""
    if len({t for _, t, _ in points}) < 2 or len({n for n, _, _ in points}) < 2:
        return None
    n = np.log(np.array([p[0] for p in points], dtype=np.float64) / 2**14)
    t = np.log(np.array([p[1] for p in points], dtype=np.float64))
    y = np.log(np.array([p[2] for p in points], dtype=np.float64))
    design = np.stack([np.ones_like(n), n, -t], axis=1)
    (c, a, beta), *_ = np.linalg.lstsq(design, y, rcond=None)
    rms = float(np.sqrt(np.mean((design @ np.array([c, a, beta]) - y) ** 2)))
    return {
        "token_exponent": float(beta),
        "n_exponent": float(a),
        "ref_tokens": float(math.exp(c / beta)) if beta > 0 else float("inf"),
        "rms_log": rms,
        "points": len(points),
    }


def _refined_best(by_mult: dict[float, float]) -> float:
    """The lr multiple at the minimum of a parabola through the best point and its neighbours
    (in log lr); the best grid point itself at the grid's edge."""
    mults = sorted(by_mult)
    i = min(range(len(mults)), key=lambda j: by_mult[mults[j]])
    if i == 0 or i == len(mults) - 1:
        return mults[i]
    x = np.log(np.array(mults[i - 1 : i + 2]))
    y = np.array([by_mult[m] for m in mults[i - 1 : i + 2]])
    a, b, _ = np.polyfit(x, y, 2)
    return float(math.exp(-b / (2 * a))) if a > 0 else mults[i]


# ------------------------------------------------------------------------------- frontier
def _label(r: Row) -> str:
    return f"l1={r['l1']:g}" if r["architecture"] == "relu" else f"k={r['k']}"


def frontier_section(rows: list[Row], out: str) -> str:
    runs = _by(rows, "frontier")
    if not runs:
        return ""
    # each architecture's points at its chosen lr (the one its grid ran at)
    curves: dict[str, list[Row]] = {}
    for arch in ("topk", "batchtopk", "relu"):
        mine = [r for r in runs if r["architecture"] == arch]
        if not mine:
            continue
        grid = defaultdict(list)
        for r in mine:
            grid[r["lr_mult"]].append(r)
        chosen = max(grid.values(), key=len)  # the grid's lr (the sweep's other lrs ran one point)
        curves[arch] = sorted(chosen, key=lambda r: r["heldout_l0"])
    body = [
        [
            arch,
            _label(r),
            f"{r['lr_mult']:g}x",
            r["heldout_l0"],
            r["heldout_nmse"],
            r.get("kl", float("nan")),
            r["heldout_dead_fraction"],
        ]
        for arch, pts in curves.items()
        for r in pts
    ]
    _write_csv(
        os.path.join(out, "frontier.csv"),
        [
            {
                k: r.get(k)
                for k in (
                    "architecture",
                    "n",
                    "k",
                    "l1",
                    "lr_mult",
                    "lr",
                    "heldout_l0",
                    "heldout_nmse",
                    "kl",
                    "heldout_dead_fraction",
                    "seconds",
                )
            }
            for r in runs
        ],
    )
    matched = _matched_l0(curves)

    def draw_metric(metric: str, ylabel: str) -> Callable[[Any], None]:
        def draw(ax: Any) -> None:
            for arch, pts in curves.items():
                ax.plot([r["heldout_l0"] for r in pts], [r.get(metric, float("nan")) for r in pts], "o-", label=arch)
            ax.set(
                xscale="log", yscale="log", xlabel="L0 (held-out, inference)", ylabel=ylabel, title=f"N={runs[0]['n']}"
            )
            ax.legend()

        return draw

    _plot(os.path.join(out, "frontier_nmse.png"), draw_metric("heldout_nmse", "held-out NMSE"))
    _plot(os.path.join(out, "frontier_kl.png"), draw_metric("kl", "downstream KL (nats/token)"))
    text = [
        "## Sparsity-reconstruction frontier (`--only frontier`)",
        "",
        f"N={runs[0]['n']}; TopK and BatchTopK sweep k, ReLU sweeps its L1 coefficient. Each architecture ran a "
        "3-point lr sweep (multiples of the default) at the middle of its grid and the grid at the best of those. "
        "L0 is measured at inference on the held-out shard (BatchTopK: its JumpReLU at the learned threshold; "
        "ReLU: all positive latents); KL is `jobs/eval.py`'s downstream KL(clean || spliced) on 64 held-out windows.",
        "",
        _table(["architecture", "setting", "lr", "L0", "NMSE", "KL", "dead (held-out)"], body),
        "",
        "At matched L0 (each curve interpolated in log-log at TopK's L0 values; – outside a curve's range):",
        "",
        _table(["L0", "TopK NMSE", "BatchTopK NMSE", "ReLU NMSE", "TopK KL", "BatchTopK KL", "ReLU KL"], matched),
        "",
        "![frontier NMSE](frontier_nmse.png) ![frontier KL](frontier_kl.png)",
        "",
        f"{len(runs)} runs, {_minutes(runs):.1f} min of training.",
    ]
    return "\n".join(text) + "\n"


def _interp(pts: list[Row], l0: float, metric: str) -> float:
    xs = np.log([r["heldout_l0"] for r in pts])
    ys = [r.get(metric, float("nan")) for r in pts]
    if not all(y is not None and y > 0 for y in ys) or not xs[0] <= math.log(l0) <= xs[-1]:
        return float("nan")
    return float(np.exp(np.interp(math.log(l0), xs, np.log(ys))))


def _matched_l0(curves: dict[str, list[Row]]) -> list[list[Any]]:
    if "topk" not in curves:
        return []
    out = []
    for r in curves["topk"]:
        l0 = r["heldout_l0"]
        row: list[Any] = [round(l0, 1)]
        for metric in ("heldout_nmse", "kl"):
            row += [
                _interp(curves[a], l0, metric) if a in curves else float("nan") for a in ("topk", "batchtopk", "relu")
            ]
        out.append(row)
    return out


# ---------------------------------------------------------------------------- progressive
def progressive_section(rows: list[Row], out: str) -> str:
    runs = _by(rows, "progressive")
    if not runs:
        return ""
    ks = sorted({int(c.split("k")[-1]) for r in runs for c in r if c.startswith("nmse_at_k")})
    body = [
        ["Multi-TopK" if r["multi_topk"] else "TopK", *[r.get(f"nmse_at_k{k}", float("nan")) for k in ks]] for r in runs
    ]

    def draw(ax: Any) -> None:
        for r in runs:
            ax.plot(ks, [r[f"nmse_at_k{k}"] for k in ks], "o-", label="Multi-TopK" if r["multi_topk"] else "TopK")
        ax.axvline(runs[0]["k"], color="grey", lw=0.8, ls=":")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="test-time k",
            ylabel="held-out NMSE",
            title=f"trained at k={runs[0]['k']}, N={runs[0]['n']}",
        )
        ax.legend()

    _plot(os.path.join(out, "progressive.png"), draw)
    _write_csv(
        os.path.join(out, "progressive.csv"),
        [{k: v for k, v in r.items() if k.startswith(("nmse_at", "multi", "n", "k"))} for r in runs],
    )
    text = [
        "## Progressive recovery (`--only progressive`)",
        "",
        "TopK and Multi-TopK (L(k) + L(4k)/8) trained at k=32, evaluated with test-time TopK at k/4 .. 4k.",
        "",
        _table(["model", *[f"k={k}" for k in ks]], body),
        "",
        "![progressive recovery](progressive.png)",
        "",
    ]
    return "\n".join(text) + "\n"


# -------------------------------------------------------------------------------- scaling
def scaling_section(rows: list[Row], out: str) -> str:
    from saescale.sweeps.report import run as fit_and_plot

    runs = _by(rows, "scaling")
    if not runs:
        return ""
    folder = os.path.join(out, "scaling")
    os.makedirs(folder, exist_ok=True)
    table = [
        {
            "status": "finished",
            "n_latents": r["n"],
            "k": r["k"],
            "lr": r["lr"],
            "lr_mult": r["lr_mult"],
            "seed": r["seed"],
            "tokens": r["tokens"],
            "compute": FLOPS_PER_TOKEN_DN * r["tokens"] * 576 * r["n"],
            "heldout_nmse": r["heldout_nmse"],
            "heldout_dead_fraction": r["heldout_dead_fraction"],
        }
        for r in runs
    ]
    results = os.path.join(folder, "results.csv")
    _write_csv(results, table)
    fits = fit_and_plot(results, "heldout_nmse", folder)
    picked = fits.get("picked", [])
    tokens = {(r["n"], r["k"], r["lr"]): r["tokens"] for r in runs}
    body = [
        [
            p["n_latents"],
            p["k"],
            tokens.get((p["n_latents"], p["k"], p["lr"]), "?"),
            f"{p['lr']:.3g}",
            p["heldout_nmse"],
        ]
        for p in picked
    ]
    law_rows = []
    for k, fit in sorted(fits["L(N)"].items(), key=lambda kv: int(kv[0])):
        law_rows.append(
            [
                f"L(N), k={k}",
                *(f"{fit['params'][p]:.4g} ± {fit['stderr'][p]:.2g}" for p in ("e", "a", "b")),
                fit["n_points"],
            ]
        )
    joint = fits.get("L(N,k)")
    text = [
        "## Scaling with the lr tuned per size (`--only scaling`)",
        "",
        "Each N trained on the 1M-token cache with a budget that grows with N and a 3-point lr sweep "
        "(multiples of the default); `saescale scaling fit` keeps each (N, k)'s best run and refits:",
        "",
        f"    saescale scaling fit {os.path.relpath(results)} --out {os.path.relpath(folder)}",
        "",
        _table(["N", "k", "tokens", "best lr", "held-out NMSE"], body),
        "",
        _table(["law", "e", "a", "b", "points"], law_rows)
        if law_rows
        else "(no L(N) fit: " + json.dumps(fits["errors"]) + ")",
        "",
    ]
    if joint:
        text += ["Joint law: " + ", ".join(f"{k}={v:.4g}" for k, v in joint["params"].items()), ""]
    text += [
        f"The paper's exponents, for comparison: {PAPER_EXPONENTS}.",
        "",
        f"![L(N)]({os.path.relpath(os.path.join(folder, 'loss_vs_latents.png'), out)})",
        "",
        f"{len(runs)} runs, {_minutes(runs):.1f} min of training.",
    ]
    return "\n".join(text) + "\n"


# ----------------------------------------------------------------------------------- dead
def dead_section(rows: list[Row], out: str) -> str:
    runs = _by(rows, "dead")
    if not runs:
        return ""
    body = [
        [
            r["n"],
            "on" if r["auxk"] else "off",
            "on" if r["transpose_init"] else "off",
            r["heldout_dead_fraction"],
            r["train_dead_fraction"],
            r["heldout_nmse"],
        ]
        for r in sorted(runs, key=lambda r: (r["n"], not r["auxk"], not r["transpose_init"]))
    ]

    def draw(ax: Any) -> None:
        for auxk in (True, False):
            for tr in (True, False):
                pts = sorted((r for r in runs if r["auxk"] == auxk and r["transpose_init"] == tr), key=lambda r: r["n"])
                ax.plot(
                    [r["n"] for r in pts],
                    [100 * r["train_dead_fraction"] for r in pts],
                    "o-",
                    label=f"AuxK {'on' if auxk else 'off'}, transpose init {'on' if tr else 'off'}",
                )
        ax.set(
            xscale="log",
            xlabel="N (latents)",
            ylabel="dead latents (%)",
            title="dead: unfired in the last 100k training tokens",
        )
        ax.legend(fontsize=7)

    _plot(os.path.join(out, "dead.png"), draw)
    text = [
        "## Dead latents against N (`--only dead`)",
        "",
        "TopK k=32 at the default lr; dead = not fired in the last 100k training tokens (the AuxK counter), "
        "and never fired on the held-out shard.",
        "",
        _table(["N", "AuxK", "transpose init", "dead (held-out)", "dead (train counter)", "NMSE"], body),
        "",
        "![dead latents](dead.png)",
        "",
    ]
    return "\n".join(text) + "\n"


# -------------------------------------------------------------------------------- metrics
def metrics_section(rows: list[Row], out: str) -> str:
    runs = sorted((r for r in _by(rows, "scaling") if "eval" in r), key=lambda r: (r["k"], r["n"]))
    if not runs:
        return ""
    body = []
    for r in runs:
        e = r["eval"]
        body.append(
            [
                r["n"],
                r["k"],
                f"{e['probe_loss']:.4f} ± {e['probe_loss_std']:.3f}",
                f"{e['n2g_precision']:.3f} ± {e['n2g_precision_std']:.3f}",
                f"{e['n2g_recall']:.3f} ± {e['n2g_recall_std']:.3f}",
                f"{e['ablation_sparsity']:.4g}",
                e["kl"],
                r["heldout_nmse"],
            ]
        )
    _write_csv(
        os.path.join(out, "metrics.csv"),
        [{"n": r["n"], "k": r["k"], **r["eval"], "heldout_nmse": r["heldout_nmse"]} for r in runs],
    )

    def draw(ax: Any) -> None:
        ns = [r["n"] for r in runs]
        for key, label in (
            ("probe_loss", "probe loss"),
            ("n2g_precision", "N2G precision"),
            ("n2g_recall", "N2G recall"),
        ):
            ax.errorbar(
                ns,
                [r["eval"][key] for r in runs],
                yerr=[r["eval"][key + "_std"] for r in runs],
                fmt="o-",
                capsize=3,
                label=label,
            )
        ax.plot(ns, [10 * r["eval"]["kl"] for r in runs], "s--", label="10 x downstream KL")
        ax.set(
            xscale="log", xlabel="N (latents)", title="the paper's metrics against N (mean ± std over tasks / latents)"
        )
        ax.legend(fontsize=7)

    _plot(os.path.join(out, "metrics.png"), draw, size=(6.5, 4.5))
    text = [
        "## The paper's metrics against N (`--only metrics`)",
        "",
        "`jobs/eval.py` on each size's best scaling run, on the held-out shard: mean probe loss over the built-in "
        "tasks (± std over tasks), N2G precision and recall of 32 sampled latents (± std over latents), ablation "
        "sparsity, downstream KL.",
        "",
        _table(["N", "k", "probe loss", "N2G precision", "N2G recall", "ablation sparsity", "KL", "NMSE"], body),
        "",
        "![metrics](metrics.png)",
        "",
    ]
    return "\n".join(text) + "\n"


def write_report(rows: list[Row], out: str, preset: str) -> str:
    """docs/paper/README.md and its tables and plots, from the runs' rows (`sweeps.paper.report_rows`)."""
    os.makedirs(out, exist_ok=True)
    lr_text, lr_fit = lr_section(rows, out)
    sections = [
        lr_text,
        frontier_section(rows, out),
        progressive_section(rows, out),
        scaling_section(rows, out),
        dead_section(rows, out),
        metrics_section(rows, out),
    ]
    total = _minutes(rows)
    head = [
        "# The paper's comparisons on the embedded default",
        "",
        f"Generated by `python jobs/paper.py --preset {preset}` (`make paper` runs the full preset) from "
        f"{len(rows)} runs, each a Ray Job of `jobs/train.py` launched by a Hydra multirun of "
        "`conf/experiment/paper/<experiment>.yaml` through saescale's sweep launcher, two at a time "
        f"({total:.0f} min of the runs' own training time, Ray start-up included, on this machine). "
        "SmolLM2-135M-Instruct, layer 8 residual stream, Shakespeare; held-out = the cache's shard 0, "
        "which no run trains on. Every number below comes from the runs' `result.json` (and `jobs/eval.py`'s "
        "results beside them), one row per run in `runs.jsonl` here.",
        "",
    ]
    text = "\n".join(head) + "\n" + "\n".join(s for s in sections if s)
    with open(os.path.join(out, "README.md"), "w") as handle:
        handle.write(text)
    with open(os.path.join(out, "runs.jsonl"), "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    if lr_fit:
        print(
            f"budget rule fit: token exponent {lr_fit['token_exponent']:.3f}, N exponent {lr_fit['n_exponent']:.3f}, "
            f"T_ref {lr_fit['ref_tokens']:.4g}"
        )
    return text
