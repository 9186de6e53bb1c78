"""Memory planner: per-rank bytes of a (data x tensor)-parallel TopK SAE run, and a refusal,
naming the knob to turn, when a configuration cannot fit a device.

Per rank (TP shards the latents; every rank of a TP group sees its DP group's whole batch;
rows = batch / dp, micro = rows / micro_batches, e = 2 bytes for bf16/fp16 and 4 for fp32):
  weights   (2 n_local d + n_local + d) * 4         W_enc, W_dec rows, b_enc slice, b_pre (float32)
  grads     same as weights                          (float32)
  adam      2 x weights (exp_avg, exp_avg_sq)        (float32)
  ema       weights, if an EMA is kept               (float32)
  lowp      (n_local d + n_local) * e, bf16/fp16 only: the encoder copy the GEMM reads
  preact    micro * n_local * e                      the encoder GEMM output, one micro-batch
  buffers   everything after the selection runs on the whole batch: eight float32 [rows, d]
            (input, normalised input, centred input, error, its gradient, AuxK's residual, error
            and gradient), the TP top-k gather (rows * tp * k values + int64 indices, twice:
            the parts and their concatenation), the low-precision selection's candidates
            (micro * (k + max(8, k/4)) * (e + 8)), 64 MiB of slack
  auxk      AuxK with every rank's dead latents >= k_aux (its worst case): under TP the
            per-micro-batch candidate gather (2 * micro * tp * k_aux * 12) and the ragged code of
            owned entries (rows * k_aux / tp * 40); at tp=1 the dense dead block and its
            gradient (2 * rows * min(16 k_aux, n_local) * e) or the [rows, k_aux] sparse code
  data      what the rank's data iterators hold, given by the job (`data_bytes`): each stream it
            reads keeps its shuffle buffer and prefetched batches in the worker's memory

`micro_batches="auto"` picks the fewest (a power of two dividing rows) that fit; `fewest_workers`
picks the smallest (tp, dp) layout that fits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from saescale.core.config import default_k_aux

RUNTIME_SLACK_BYTES = 64 * 2**20  # allocator and runtime overhead beside the planned tensors
# CPU low-precision encoder GEMMs run in blocks of latents of at most this many outputs each
# (`train.step`): a CPU bf16/fp16 GEMM accumulates its output in a float32 temporary, bounded so
CPU_LOWP_GEMM_ELEMS = 2**24
MAX_MICRO_BATCHES = 64  # more micro-batches than this: the GEMMs get too thin to keep a GPU busy

GiB = 2**30

# bytes per element of the O(batch * n_latents) work in each precision ("auto" is resolved by the
# caller: the planner must not guess which hardware the workers have)
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


class PlanError(ValueError):
    """The configuration is invalid or cannot fit; the message names what to change."""


class DoesNotFit(PlanError):
    """A valid configuration that needs more memory than the device has; `plan` is the closest."""

    def __init__(self, message: str, plan: MemoryPlan) -> None:
        super().__init__(message)
        self.plan = plan


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
    precision: str
    n_local: int
    weights: int
    grads: int
    adam: int
    ema: int
    lowp: int
    preact: int
    buffers: int
    auxk: int
    total: int
    device_bytes: int
    fits: bool
    data: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        rows = [
            ("weights", self.weights),
            ("grads", self.grads),
            ("adam", self.adam),
            ("ema", self.ema),
            ("low-prec W_enc", self.lowp),
            ("pre-activation", self.preact),
            ("buffers", self.buffers),
            ("auxk (worst)", self.auxk),
            ("data", self.data),
            ("total", self.total),
            ("device", self.device_bytes),
        ]
        head = (
            f"n_latents={self.n_latents} d_model={self.d_model} k={self.k} workers={self.workers} "
            f"tp={self.tp} dp={self.dp} batch={self.batch} micro_batches={self.micro_batches} "
            f"precision={self.precision} latents/rank={self.n_local}"
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
    micro_batches: int | str = 1,
    ema: bool = False,
    device_gib: float = 80.0,
    precision: str = "fp32",
    max_micro_batches: int = MAX_MICRO_BATCHES,
    k_aux: int | None = None,
    data_bytes: int = 0,
) -> MemoryPlan:
    """The per-rank plan; `micro_batches="auto"` -> `auto_micro_batches` (raises if none fits).
    `k_aux` defaults to the SAE config's (a power of two near d_model / 2); `data_bytes`: what
    the rank's data iterators hold (see the module)."""
    if micro_batches == "auto":
        return auto_micro_batches(
            n_latents, d_model, k, workers, tp, batch, ema, device_gib, precision, max_micro_batches, k_aux, data_bytes
        )
    if isinstance(micro_batches, str) or micro_batches <= 0:
        raise PlanError(f"micro_batches must be a positive integer or 'auto'; got {micro_batches!r}")
    e = _element_bytes(precision)
    if tp <= 0 or workers <= 0 or workers % tp:
        raise PlanError(f"workers={workers} must be a positive multiple of tp={tp}")
    if n_latents % tp:
        raise PlanError(f"n_latents={n_latents} is not divisible by tp={tp}")
    dp = workers // tp
    if batch % (dp * micro_batches):
        raise PlanError(f"batch={batch} must divide into dp={dp} groups x micro_batches={micro_batches}")
    n_local = n_latents // tp
    rows = batch // dp
    micro = rows // micro_batches
    weights = (2 * n_local * d_model + n_local + d_model) * 4
    lowp = (n_local * d_model + n_local) * e if e < 4 else 0
    preact = micro * n_local * e
    buffers = 8 * rows * d_model * 4 + RUNTIME_SLACK_BYTES
    if tp > 1:
        buffers += 2 * rows * tp * k * 12  # the global top-k's gathered candidates, parts and concatenation
    if e < 4:
        buffers += micro * (k + max(8, k // 4)) * (e + 8)  # low-precision candidates, re-scored in float32
        buffers += min(micro * n_local, CPU_LOWP_GEMM_ELEMS) * 4  # a CPU GEMM's float32 temporary, one block
    auxk = _auxk_bytes(rows, micro, tp, n_local, min(k_aux or default_k_aux(d_model), n_latents), e)
    ema_bytes = weights if ema else 0
    total = 4 * weights + ema_bytes + lowp + preact + buffers + auxk + data_bytes
    device = int(device_gib * GiB)
    return MemoryPlan(
        n_latents=n_latents,
        d_model=d_model,
        k=k,
        workers=workers,
        tp=tp,
        dp=dp,
        batch=batch,
        micro_batches=micro_batches,
        precision=precision,
        n_local=n_local,
        weights=weights,
        grads=weights,
        adam=2 * weights,
        ema=ema_bytes,
        lowp=lowp,
        preact=preact,
        buffers=buffers,
        auxk=auxk,
        total=total,
        device_bytes=device,
        fits=total <= device,
        data=data_bytes,
    )


def _auxk_bytes(rows: int, micro: int, tp: int, n_local: int, k_aux: int, e: int) -> int:
    """AuxK's worst case (every rank has >= k_aux dead latents; a healthy run needs far less)."""
    if tp > 1:
        return 2 * micro * tp * k_aux * 12 + rows * -(-k_aux // tp) * 40
    return max(2 * rows * min(16 * k_aux, n_local) * e, rows * k_aux * 12)


def _element_bytes(precision: str) -> int:
    if precision not in ELEMENT_BYTES:
        raise PlanError(
            f"precision must be one of {', '.join(ELEMENT_BYTES)}; got {precision!r} "
            "(resolve 'auto' to the workers' precision before planning)"
        )
    return ELEMENT_BYTES[precision]


def _micro_batch_choices(rows: int, max_micro_batches: int) -> list[int]:
    """Powers of two that divide `rows`, up to `max_micro_batches`, smallest first."""
    choices, m = [], 1
    while m <= max_micro_batches and rows % m == 0:
        choices.append(m)
        m *= 2
    return choices


def auto_micro_batches(
    n_latents: int,
    d_model: int,
    k: int,
    workers: int,
    tp: int,
    batch: int,
    ema: bool = False,
    device_gib: float = 80.0,
    precision: str = "fp32",
    max_micro_batches: int = MAX_MICRO_BATCHES,
    k_aux: int | None = None,
    data_bytes: int = 0,
) -> MemoryPlan:
    """The plan with the fewest micro-batches (a power of two dividing batch/dp, at most
    `max_micro_batches`) that fits: fewer micro-batches keep the GEMMs fat. Raises `DoesNotFit`,
    naming the knob, when even the most micro-batches do not fit."""

    def plan_at(m: int) -> MemoryPlan:
        return plan_memory(
            n_latents, d_model, k, workers, tp, batch, m, ema, device_gib, precision, k_aux=k_aux, data_bytes=data_bytes
        )

    plan = plan_at(1)
    for m in _micro_batch_choices(batch // plan.dp, max_micro_batches)[1:]:
        if plan.fits:
            break
        plan = plan_at(m)
    if not plan.fits:
        raise DoesNotFit(_refusal(plan, auto=True), plan)
    return plan


def fewest_workers(
    n_latents: int,
    d_model: int,
    k: int,
    batch: int,
    ema: bool = False,
    precision: str = "fp32",
    device_gib: float = 80.0,
    max_micro_batches: int = MAX_MICRO_BATCHES,
) -> MemoryPlan:
    """The fitting plan with the fewest workers (tp a power of two dividing n_latents, batch
    divisible by the workers, as the mesh requires), with auto micro-batches. Among equal worker
    counts the larger tp wins: dp all-reduces the whole gradient every step, tp only gathers
    top-k candidates."""
    _element_bytes(precision)
    if n_latents <= 0 or batch <= 0:
        raise PlanError(f"n_latents={n_latents} and batch={batch} must be positive")
    tps = [tp for tp in _powers_of_two_dividing(n_latents) if batch % tp == 0]
    layouts = sorted((tp * dp, -tp) for tp in tps for dp in _divisors(batch // tp))
    closest: MemoryPlan | None = None
    for workers, neg_tp in layouts:
        try:
            return auto_micro_batches(
                n_latents, d_model, k, workers, -neg_tp, batch, ema, device_gib, precision, max_micro_batches
            )
        except DoesNotFit as exc:
            closest = exc.plan  # the last one tried has the most workers
    assert closest is not None  # tp=1, dp=1 is always among the layouts
    raise DoesNotFit(
        f"no layout (tp a power of two dividing n_latents={n_latents}, workers dividing batch={batch}) "
        f"fits {device_gib:g} GiB per worker, not even {closest.workers} workers at tp={closest.tp}: "
        "lower batch or n_latents, or use larger devices",
        closest,
    )


def _powers_of_two_dividing(n: int) -> list[int]:
    return [2**i for i in range((n & -n).bit_length())] if n > 0 else []


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def check_fits(plan: MemoryPlan) -> None:
    """Refuse a plan that does not fit, naming the knob that helps most."""
    if not plan.fits:
        raise DoesNotFit(_refusal(plan, auto=False), plan)


def _refusal(plan: MemoryPlan, auto: bool) -> str:
    over = plan.total - plan.device_bytes
    state = plan.weights + plan.grads + plan.adam + plan.ema + plan.lowp
    if state > plan.device_bytes * 0.8:
        hint = (
            f"weights, grads and Adam state alone take {state / GiB:.1f} GiB per rank: raise tp "
            f"(now {plan.tp}) so each rank holds fewer latents"
        )
    elif auto:
        hint = (
            f"even at micro_batches={plan.micro_batches} (the most 'auto' tries) the batch's "
            f"buffers and pre-activation take {(plan.preact + plan.buffers) / GiB:.1f} GiB: raise "
            f"the workers (dp, now {plan.dp}) or tp (now {plan.tp}), or lower batch"
        )
    else:
        hint = (
            f"the [batch/dp, n_latents/tp] pre-activation takes {plan.preact / GiB:.1f} GiB: raise "
            f"micro_batches (now {plan.micro_batches}), lower batch, or raise tp"
        )
    return (
        f"per-rank memory {plan.total / GiB:.1f} GiB exceeds the device's "
        f"{plan.device_bytes / GiB:.1f} GiB by {over / GiB:.1f} GiB; {hint}"
    )


# ------------------------------------------------------------------------ checkpoint cadence
def young_daly_interval_s(checkpoint_s: float, mtbf_s: float) -> float:
    """Seconds of training between checkpoints that minimise the expected time lost to them and
    to recomputation after a failure: sqrt(2 C M) for a checkpoint stalling C seconds and a
    failure every M seconds on average (Young 1974; Daly 2006)."""
    return math.sqrt(2.0 * max(checkpoint_s, 0.0) * mtbf_s)


@dataclass
class CheckpointPlan:
    """What `train.checkpoint_every=auto` will about choose for a layout, before measuring."""

    bytes_per_rank: int  # weights, Adam, EMA: what each rank of DP replica 0 writes
    stall_s: float  # copying them aside (host memory) at the step
    upload_s: float  # writing them to storage in the background
    interval_s: float  # Young/Daly, at least one upload (one checkpoint in flight)
    mtbf_s: float

    def line(self) -> str:
        return (
            f"checkpoint_every=auto: {self.bytes_per_rank / GiB:.2f} GiB per rank; copied aside in ~{self.stall_s:.2g} s "
            f"(the stall), uploaded in ~{self.upload_s:.2g} s; with a failure every {self.mtbf_s:g} s, a checkpoint "
            f"about every {self.interval_s:.0f} s (sqrt(2 x stall x MTBF), at least one upload); the run measures its own"
        )


def plan_checkpoints(
    plan: MemoryPlan, mtbf_s: float, copy_gb_s: float = 5.0, upload_gb_s: float = 0.5
) -> CheckpointPlan:
    """The checkpoint interval of a layout from assumed rates: copying to host memory at
    `copy_gb_s` (PCIe or memcpy), writing to storage at `upload_gb_s` per rank."""
    nbytes = plan.weights + plan.adam + plan.ema
    stall, upload = nbytes / (copy_gb_s * 1e9), nbytes / (upload_gb_s * 1e9)
    return CheckpointPlan(nbytes, stall, upload, max(young_daly_interval_s(stall, mtbf_s), upload), mtbf_s)
