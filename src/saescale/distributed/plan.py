"""Memory planner: per-rank bytes of a (data x tensor)-parallel TopK SAE run, and a refusal,
naming the knob to turn, when a configuration cannot fit a device.

Per rank (TP shards the latents; every rank of a TP group sees its DP group's whole batch):
  weights   (2 n_local d + n_local + d) * 4         W_enc, W_dec rows, b_enc slice, b_pre
  grads     same as weights
  adam      2 x weights (exp_avg, exp_avg_sq)
  ema       weights, if an EMA is kept
  preact    (batch / dp / micro_batches) * n_local * 4   the encoder GEMM output, one micro-batch
  buffers   the [batch/dp, d] inputs twice, six [micro-batch, d] activations/gradients, the
            gathered top-k candidates (micro-batch * tp * k values + int64 indices), 64 MiB
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

RUNTIME_SLACK_BYTES = 64 * 2**20  # allocator and runtime overhead beside the planned tensors

GiB = 2**30


class PlanError(ValueError):
    """The configuration is invalid or cannot fit; the message names what to change."""


@dataclass
class MemoryPlan:
    n_latents: int
    d_model: int
    k: int
    workers: int
    tp: int
    dp: int
    batch: int
    micro_batches: int
    n_local: int
    weights: int
    grads: int
    adam: int
    ema: int
    preact: int
    buffers: int
    total: int
    device_bytes: int
    fits: bool

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        rows = [
            ("weights", self.weights),
            ("grads", self.grads),
            ("adam", self.adam),
            ("ema", self.ema),
            ("pre-activation", self.preact),
            ("buffers", self.buffers),
            ("total", self.total),
            ("device", self.device_bytes),
        ]
        head = (
            f"n_latents={self.n_latents} d_model={self.d_model} k={self.k} workers={self.workers} "
            f"tp={self.tp} dp={self.dp} batch={self.batch} micro_batches={self.micro_batches} "
            f"latents/rank={self.n_local}"
        )
        lines = [head, f"{'per rank':<16}{'GiB':>12}"]
        lines += [f"{name:<16}{value / GiB:>12.2f}" for name, value in rows]
        lines.append("fits" if self.fits else "DOES NOT FIT")
        return "\n".join(lines)


def plan_memory(
    n_latents: int,
    d_model: int,
    k: int,
    workers: int,
    tp: int,
    batch: int,
    micro_batches: int = 1,
    ema: bool = False,
    device_gib: float = 80.0,
) -> MemoryPlan:
    if tp <= 0 or workers <= 0 or workers % tp:
        raise PlanError(f"workers={workers} must be a positive multiple of tp={tp}")
    if n_latents % tp:
        raise PlanError(f"n_latents={n_latents} is not divisible by tp={tp}")
    dp = workers // tp
    if batch % (dp * micro_batches):
        raise PlanError(f"batch={batch} must divide into dp={dp} groups x micro_batches={micro_batches}")
    n_local = n_latents // tp
    rows = batch // dp
    weights = (2 * n_local * d_model + n_local + d_model) * 4
    preact = (rows // micro_batches) * n_local * 4
    micro = rows // micro_batches
    buffers = 2 * rows * d_model * 4 + 6 * micro * d_model * 4 + micro * tp * k * 12 + RUNTIME_SLACK_BYTES
    total = 4 * weights + (weights if ema else 0) + preact + buffers
    device = int(device_gib * GiB)
    return MemoryPlan(
        n_latents,
        d_model,
        k,
        workers,
        tp,
        dp,
        batch,
        micro_batches,
        n_local,
        weights,
        weights,
        2 * weights,
        weights if ema else 0,
        preact,
        buffers,
        total,
        device,
        total <= device,
    )


def check_fits(plan: MemoryPlan) -> None:
    """Refuse a plan that does not fit, naming the knob that helps most."""
    if plan.fits:
        return
    over = plan.total - plan.device_bytes
    state = plan.weights + plan.grads + plan.adam + plan.ema
    if state > plan.device_bytes * 0.8:
        hint = (
            f"weights, grads and Adam state alone take {state / GiB:.1f} GiB per rank: raise tp "
            f"(now {plan.tp}) so each rank holds fewer latents"
        )
    else:
        hint = (
            f"the [batch/dp, n_latents/tp] pre-activation takes {plan.preact / GiB:.1f} GiB: raise "
            f"micro_batches (now {plan.micro_batches}), lower batch, or raise tp"
        )
    raise PlanError(
        f"per-rank memory {plan.total / GiB:.1f} GiB exceeds the device's "
        f"{plan.device_bytes / GiB:.1f} GiB by {over / GiB:.1f} GiB; {hint}"
    )
