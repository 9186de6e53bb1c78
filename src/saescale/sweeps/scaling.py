"""Scaling-law fits of Gao et al. (2024), with parameter uncertainties.

    L(N)    = e + a * N^b                       at fixed k (b < 0; e is the irreducible loss)
    L(C)    = e + a * C^b                       against training compute
    L(N, k) = exp(a + b_k log k + b_N log N + g log k log N) + exp(z + h log k)     (paper eq. 2)
    T(N)    = c * N^p                           tokens to convergence

Fits are nonlinear least squares (`scipy.optimize.curve_fit`); the joint law and T(N) are fitted
to log values (the losses span orders of magnitude, and the paper fits in log space).
Uncertainties are one standard error from the fit's covariance. Input is a results table with
one row per run (`n_latents`, `k`, the loss column, optionally `compute` and
`tokens_to_convergence`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import curve_fit

from saescale.train.convergence import tokens_to_convergence  # noqa: F401 - part of this module's API

# training FLOPs per token per (d_in x n_latents): the encoder GEMM forward and its two backward
# GEMMs, 2 FLOPs a multiply-add each (the compute axis of L(C))
FLOPS_PER_TOKEN_DN = 6.0


class FitError(ValueError):
    """Too few points, or the fit did not converge; the message says which."""


@dataclass
class Fit:
    law: str
    params: dict[str, float]
    stderr: dict[str, float]
    r2_log: float  # R^2 of log(loss) against log(prediction)
    n_points: int

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        terms = ", ".join(f"{k}={v:.4g}±{self.stderr[k]:.2g}" for k, v in self.params.items())
        return f"{self.law}: {terms} (R² on log = {self.r2_log:.4f}, {self.n_points} points)"


def _r2_log(y: np.ndarray, pred: np.ndarray) -> float:
    ly, lp = np.log(y), np.log(np.clip(pred, 1e-300, None))
    ss_res = float(((ly - lp) ** 2).sum())
    ss_tot = float(((ly - ly.mean()) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def _check(n_points: int, n_params: int, law: str) -> None:
    if n_points <= n_params:
        raise FitError(f"{law} has {n_params} parameters but only {n_points} points; run more configurations")


def _fit(law: str, func, x, y, p0, names: list[str], log_target: bool, bounds=(-np.inf, np.inf)) -> Fit:
    y = np.asarray(y, dtype=np.float64)
    if np.any(y <= 0) or not np.all(np.isfinite(y)):
        raise FitError(f"{law}: losses must be positive and finite")
    _check(len(y), len(names), law)
    target = np.log(y) if log_target else y
    model = (lambda x_, *p: np.log(np.clip(func(x_, *p), 1e-300, None))) if log_target else func
    try:
        params, cov = curve_fit(model, x, target, p0=p0, bounds=bounds, maxfev=200_000)
    except (RuntimeError, ValueError) as exc:
        raise FitError(f"{law}: the fit did not converge ({exc})") from exc
    err = np.sqrt(np.clip(np.diag(cov), 0, None)) if np.all(np.isfinite(cov)) else np.full(len(names), math.inf)
    return Fit(
        law,
        dict(zip(names, map(float, params))),
        dict(zip(names, map(float, err))),
        _r2_log(y, func(x, *params)),
        len(y),
    )


def power_law(x: np.ndarray, e: float, a: float, b: float) -> np.ndarray:
    return e + a * np.power(x, b)


def fit_power_law(x, loss, law: str = "L(N) = e + a N^b") -> Fit:
    """L = e + a x^b with e >= 0, a > 0 (fitted with x scaled to its geometric mean for
    conditioning; `a` is reported for the unscaled x)."""
    x = np.asarray(x, dtype=np.float64)
    loss = np.asarray(loss, dtype=np.float64)
    scale = float(np.exp(np.log(x).mean()))
    p0 = [float(loss.min()) * 0.5, float(loss.max() - loss.min() * 0.5), -0.5]
    fit = _fit(
        law,
        power_law,
        x / scale,
        loss,
        p0,
        ["e", "a", "b"],
        log_target=True,
        bounds=([0.0, 0.0, -5.0], [np.inf, np.inf, 5.0]),
    )
    b = fit.params["b"]
    factor = scale ** (-b)
    fit.params["a"] *= factor
    fit.stderr["a"] *= factor
    return fit


def joint_law(nk: np.ndarray, a: float, b_k: float, b_N: float, g: float, z: float, h: float) -> np.ndarray:
    n, k = nk
    lk, ln = np.log(k), np.log(n)
    return np.exp(a + b_k * lk + b_N * ln + g * lk * ln) + np.exp(z + h * lk)


def fit_joint_law(n, k, loss) -> Fit:
    """The paper's L(N, k): a power law in N whose exponent depends on k, plus an irreducible
    term that depends on k only."""
    n, k = np.asarray(n, dtype=np.float64), np.asarray(k, dtype=np.float64)
    loss = np.asarray(loss, dtype=np.float64)
    p0 = [float(np.log(loss.max())), -0.5, -0.2, 0.0, float(np.log(loss.min()) - 1.0), -0.3]
    return _fit(
        "L(N,k) = exp(a + b_k log k + b_N log N + g log k log N) + exp(z + h log k)",
        joint_law,
        np.vstack([n, k]),
        loss,
        p0,
        ["a", "b_k", "b_N", "g", "z", "h"],
        log_target=True,
    )


def fit_tokens_to_convergence(n, tokens) -> Fit:
    """T(N) = c N^p, by least squares on log T (a line in log-log)."""
    n, tokens = np.asarray(n, dtype=np.float64), np.asarray(tokens, dtype=np.float64)
    return _fit(
        "T(N) = c N^p",
        lambda x, log_c, p: np.exp(log_c + p * np.log(x)),
        n,
        tokens,
        [float(np.log(tokens.mean())), 0.5],
        ["log_c", "p"],
        log_target=True,
    )
