"""One training forward pass with a hand-written sparse backward.

The only O(batch * n_latents) work is the encoder GEMM and its top-k (the "floor"); the
pre-activation lives in one reused buffer and AuxK reads its dead columns from it. Everything
else is O(batch * k * d): the decoder gathers k rows per token, and gradients for W_dec, W_enc,
b_enc and b_pre are accumulated from the active entries only (`saescale.kernels`). Gradients are
written straight into the parameters' persistent `.grad` buffers, so a step allocates nothing
as large as a weight matrix.

Losses (all means over batch and d_in):
  main      = mse_scale * mean((x_hat - x)^2)                 mse_scale fixed from a data sample
  multi     = mse_scale * mean((x_hat_4k - x)^2) / 8          Multi-TopK, optional
  auxk      = coef * mean((e_hat - e)^2) / mean((e - mean_b e)^2),  e = x - x_hat detached,
              e_hat = W_dec z_aux (no bias) from the top-k_aux dead latents; NaN -> 0
  penalty   = the activation's penalty on the code (ReLU's l1_coef * mean_b sum_i z_bi), else 0
The dense reference in `saescale.core.reference` defines the same losses with autograd.

Architectures (`saescale.core.arch`): TopK trains through the fixed-width [batch, k] path below
(Multi-TopK, the exact global top-k under TP). BatchTopK and ReLU have no fixed per-token width:
each chunk's pre-activation offers candidates (`Activation.candidates`), their float32 values are
read (or, in low precision, recomputed from the float32 weights), the activation keeps a subset
(`Activation.keep`: BatchTopK's batch-global cut is agreed by one all-gather over TP and DP ranks)
and the kept entries form a ragged code that the same sparse kernels decode and back-propagate.

Precision (`train.precision`, see `train.precision`): in bf16/fp16 the encoder GEMM runs on a
low-precision copy of W_enc into a low-precision pre-activation, and the top-k over-selects
a quarter more candidates there; their values are recomputed in float32 from the float32 weights and
the final top-k is taken on those, so the selection matches float32 except at near-ties.

Micro-batching (`micro_batches`): only the encoder GEMM and its top-k (and AuxK's dead
columns) are O(batch * n_latents), so only they run in row chunks of batch / micro_batches;
everything after the selection is O(batch * k * d) and runs once on the whole batch. The step
is therefore exactly the batch-level step: normalisers, the dead-latent update, the AuxK
residual and every gradient are computed as without chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saescale.core.arch import activation
from saescale.core.model import TopKSAE
from saescale.distributed.parallel import DataParallel, TensorParallel
from saescale.distributed.plan import CPU_LOWP_GEMM_ELEMS
from saescale.kernels import (
    DeadBlock,
    LatentOrder,
    RaggedCode,
    dead_block_capacity,
    dead_block_width,
    dead_slots,
    latent_sums,
    resolve_aux_dtype,
    rows_by_latent_,
    sparse_decode,
    use_dense_block,
    values_grad,
    whole_bag_fits,
)
from saescale.kernels.ops import sparse_ops
from saescale.train.dead_latents import DeadLatentTracker
from saescale.train.host_sync import LaggedRead
from saescale.train.precision import Precision

# In low precision the top-k keeps a quarter more candidates (at least 8) than it needs before
# the float32 re-ranking, so near-ties at the k-th value are resolved in float32, not in bf16.
# (Measured at d=576, n=16384, k=32: 40 candidates cost 66 ms of top-k + 14 ms of re-scoring per
# 4096 rows, 64 candidates 82 + 22 ms; tests/test_precision.py checks the >= 99% agreement.)
OVERSELECT_FRACTION = 0.25
OVERSELECT_MIN = 8
# A ragged code holding at least this fraction of all batch x latent entries (ReLU early in
# training: about half) is decoded and back-propagated with dense GEMMs instead of the sparse
# kernels, whose gathers cost far more per entry (measured on an H200, d=576, n=65536, batch 4096,
# a 50%-dense ReLU code: 1.13 s a step through the sparse kernels, 0.044 s for the dense reference)
DENSE_CODE_FRACTION = 1 / 32
# The sync-free step sizes its dead block from a count read a few steps late (the host runs ahead
# of the device): it counts the latents that will be dead within this many more steps, so the
# block holds every dead latent of the steps it is used for; an older count is not used.
DEAD_COUNT_MARGIN_STEPS = 8


def _fire_counts(latents: Tensor, fired: Tensor, n_latents: int) -> Tensor:
    """[n_latents] how many entries of each latent fired (a scatter, no host read)."""
    counts = torch.zeros(n_latents, dtype=torch.long, device=latents.device)
    return counts.index_add_(0, latents.reshape(-1), fired.reshape(-1).to(torch.long))


def low_precision_candidates(width: int) -> int:
    """How many candidates a low-precision top-k keeps for `width` final entries."""
    return width + max(OVERSELECT_MIN, int(width * OVERSELECT_FRACTION))


def _mean_sq(t: Tensor) -> Tensor:
    flat = t.reshape(-1)
    return torch.dot(flat, flat) / flat.numel()


def _variance(t: Tensor) -> Tensor:
    """Mean over batch and features of the squared deviation from the batch mean (no temporaries)."""
    mean = t.mean(0)
    return _mean_sq(t) - torch.dot(mean, mean) / mean.numel()


@dataclass
class StepStats:
    loss: Tensor
    mse_loss: Tensor
    fvu: Tensor  # per-batch fraction of variance unexplained (= the paper's normalised MSE)
    auxk_loss: Tensor
    multi_topk_loss: Tensor
    l0: Tensor
    n_dead: Tensor  # dead latents after this batch (over the whole TP group), a device scalar
    fire_counts: Tensor  # [n_local] how many of this batch's tokens each latent fired on
    overflow: bool = False  # fp16: a low-precision product overflowed on this rank (skip the step)
    penalty_loss: Tensor | None = None  # the activation's penalty (ReLU's L1), None for the others
    batch_threshold: Tensor | None = None  # BatchTopK: the smallest kept value of this batch
    # sync-free steps: latents dead within DEAD_COUNT_MARGIN_STEPS more steps without firing (an
    # upper bound on the dead count of any step the host may decide for before it reads this)
    dead_soon: Tensor | None = None


@dataclass
class _Main:
    """What the main-loss part of a step hands to the rest of it."""

    err: Tensor  # x_hat - x
    mse: Tensor
    multi_loss: Tensor
    grad_b_enc: Tensor  # AuxK adds to it
    grad_b_pre: Tensor  # the decoder's share
    fire_counts: Tensor  # [n_local] tokens each of this rank's latents fired on
    l0: Tensor  # active latents per token (over the whole TP group)
    penalty: Tensor | None = None  # the activation's penalty (ReLU's L1)


SYNC_FREE_SETTINGS = {"auto": None, "on": True, "off": False}


def sync_free_setting(value: str) -> bool | None:
    """`train.sync_free`'s value as `SparseTopKStep`'s `sync_free` argument (None: auto)."""
    if value not in SYNC_FREE_SETTINGS:
        raise ValueError(f"sync_free must be auto, on or off, got {value!r}")
    return SYNC_FREE_SETTINGS[value]


def supports_sync_free(cfg, tp: TensorParallel | None, dp: DataParallel | None = None) -> str | None:
    """Why a step cannot run without host synchronisation, or None when it can: a TopK code of
    fixed width [batch, k] in one process (BatchTopK's and ReLU's codes have data-dependent
    sizes; Multi-TopK's wide code and TP's owned share are ragged or accumulated; the
    collectives of `distributed.parallel` time themselves with device synchronisations)."""
    if not activation(cfg.architecture).fixed_width:
        return f"sae.architecture={cfg.architecture} has a code of data-dependent size"
    if cfg.multi_topk:
        return "Multi-TopK accumulates a second code into the gradients"
    if tp is not None:  # (even of size 1: the TP path selects through the global top-k)
        return "a TP rank's share of the top-k differs per token"
    if dp is not None and dp.size > 1:
        return "data-parallel collectives synchronise to time themselves"
    return None


class SparseTopKStep:
    """Computes losses and writes parameter gradients for one batch of normalised inputs.

    `sync_free` (default: on for a CUDA TopK step that supports it, `supports_sync_free`): no op
    in the step makes the host wait for the device. Fire counts and the dead count stay on the
    device; AuxK runs on a fixed-shape dead block (the first dead latents in index order, found
    without `nonzero`), gated on the device by the dead count, `dead_block_width` columns wide
    from a count an earlier step made (read without waiting, `LaggedRead`) of the latents that
    will be dead within DEAD_COUNT_MARGIN_STEPS more steps, so the block holds every latent dead
    at this step: the same AuxK as the exact path. A count older than that margin is not used
    (the whole capacity then). When the count exceeds `dead_block_capacity` (a run that is not
    healthy yet), AuxK takes the exact, synchronising path. The decoder and encoder gradients
    are one embedding_bag call each (while batch x k x d fits one call: 2^30 entries x columns).
    fp16 still reads its overflow flag once per step.
    """

    def __init__(
        self,
        sae: TopKSAE,
        mse_scale: float,
        tracker: DeadLatentTracker,
        tp: TensorParallel | None = None,
        dp: DataParallel | None = None,
        precision: Precision | None = None,
        micro_batches: int = 1,
        sync_free: bool | None = None,
        kernels: str = "auto",
    ) -> None:
        """`sae` holds this rank's latents; with `tp`, its config's n_latents is the local slice
        and `tp.n_global` the whole autoencoder's (k, k_aux are global). With `dp`, `x` is this
        replica's part of the batch: dead-latent counters and the AuxK/FVU normalisers are
        computed over the whole batch, and the caller averages gradients over replicas."""
        self.sae = sae
        self.cfg = sae.cfg
        self.activation = activation(sae.cfg.architecture)
        self.tp = tp
        self.dp = dp if dp is not None and dp.size > 1 else None
        if tp is not None and sae.cfg.n_latents != tp.n_local:
            raise ValueError(f"TP shard holds {sae.cfg.n_latents} latents, expected {tp.n_local}")
        if not isinstance(micro_batches, int) or micro_batches < 1:
            raise ValueError(f"micro_batches must be an integer >= 1, got {micro_batches!r}")
        self.mse_scale = float(mse_scale)
        self.tracker = tracker
        self.precision = precision or Precision("fp32")
        if self.precision.low and not self.activation.low_precision_selection:
            self.precision = Precision("fp32")  # e.g. ReLU: its code is the sign of every entry (the trainer says so)
        self.micro_batches = micro_batches
        self._pre: Tensor | None = None
        # low precision: [W_enc | b_enc] as one [n, d + 1] matrix, and the chunk's [xc | 1], so the
        # GEMM adds the bias itself (addmm's broadcast of b_enc into the output costs a third of
        # a bf16 GEMM on CPU: measured 53 ms against 36 ms at d=576, n=16384, 4096 rows)
        self._w_enc_low: Tensor | None = None
        self._x_low: Tensor | None = None
        self._overflow = False
        for p in sae.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.cfg.aux_precision == "auto" and self.precision.low:
            self.aux_dtype = self.precision.dtype  # AuxK's dead block follows the step's precision
        else:
            self.aux_dtype = resolve_aux_dtype(self.cfg.aux_precision, sae.W_enc.device)
        self.last_aux_path = "none"  # which AuxK implementation the last step used
        self.last_main_path = "fixed_width"  # fixed_width (TopK), ragged or dense (see _main_ragged)
        why_not = supports_sync_free(self.cfg, tp, self.dp)
        if sync_free is None:
            sync_free = sae.W_enc.device.type == "cuda" and why_not is None
        elif sync_free and why_not is not None:
            raise ValueError(f"a sync-free step is not possible: {why_not}")
        self.sync_free = bool(sync_free)
        # the fixed-width code's products (`train.sparse_kernels`); the other paths use kernels.sparse
        self.ops = sparse_ops(kernels)
        self.dead_capacity = dead_block_capacity(self.cfg.n_latents, self.cfg.k_aux)
        self._dead_seen = LaggedRead()  # the dead count of an earlier step, read without waiting
        self._overflow_flag: Tensor | None = None  # sync-free fp16: any overflow, on the device

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.precision.dtype

    def chunk_rows(self, batch: int) -> int:
        """Rows per micro-batch (the last chunk may be shorter)."""
        return -(-batch // self.micro_batches)

    def pre_buffer(self, rows: int) -> Tensor:
        """The reused [rows, n_latents] pre-activation buffer, in the compute dtype (the
        benchmark's floor uses it too). Shorter chunks get a view of the same buffer."""
        n = self.cfg.n_latents
        if self._pre is None or self._pre.shape[0] < rows or self._pre.dtype != self.compute_dtype:
            self._pre = None  # free the old buffer before allocating a new one
            self._pre = torch.empty(rows, n, device=self.sae.W_enc.device, dtype=self.compute_dtype)
        return self._pre[:rows]

    def refresh_low_precision_(self) -> None:
        """Copy W_enc and b_enc into the GEMM's low-precision buffers (once per step: O(n * d),
        1/batch of the GEMM's work)."""
        if not self.precision.low:
            return
        W_enc, b_enc = self.sae.W_enc, self.sae.b_enc
        n, d = W_enc.shape
        if self._w_enc_low is None:
            self._w_enc_low = torch.empty(n, d + 1, dtype=self.compute_dtype, device=W_enc.device)
        self._w_enc_low[:, :d].copy_(W_enc)
        self._w_enc_low[:, d].copy_(b_enc)

    def encode_chunk(self, xc: Tensor) -> Tensor:
        """The encoder GEMM for a chunk of centred rows, into the reused buffer (the floor)."""
        out = self.pre_buffer(xc.shape[0])
        if self.precision.low:
            assert self._w_enc_low is not None
            rows, d = xc.shape
            if self._x_low is None or self._x_low.shape[0] < rows:
                self._x_low = torch.ones(rows, d + 1, dtype=self.compute_dtype, device=xc.device)
            x_low = self._x_low[:rows]
            x_low[:, :d].copy_(xc)
            n = out.shape[1]
            block = n if xc.device.type != "cpu" else max(1, CPU_LOWP_GEMM_ELEMS // max(rows, 1))
            if block >= n:
                return torch.mm(x_low, self._w_enc_low.t(), out=out)
            # CPU: a bf16/fp16 GEMM accumulates its whole output in float32 before converting it (a
            # [rows, n] float32 temporary, twice the pre-activation: measured 2 GiB extra at 128
            # rows x 2^22 latents); blocks of latents bound it, at the same speed and same bits
            for j in range(0, n, block):
                torch.mm(x_low, self._w_enc_low[j : j + block].t(), out=out[:, j : j + block])
            return out
        return torch.addmm(self.sae.b_enc, xc, self.sae.W_enc.t(), out=out)

    def candidates(self, pre: Tensor, count: int) -> Tensor:
        """Indices of each row's `count` largest low-precision pre-activations, by a top-k over
        the int16 view of the bits: bf16/fp16 are sign-magnitude, so non-negative values order
        like their bit patterns, and an int16 top-k runs 1.35x faster than a bf16 one on CPU
        (62 against 84 ms at 4096 x 16384). Negative values, which the ReLU zeroes, may be picked
        in another order; that changes nothing downstream (they fire nowhere and carry no
        gradient), and the float32 re-ranking orders whatever is picked."""
        return pre.view(torch.int16).topk(count, dim=1, sorted=False).indices

    def select(self, pre: Tensor, xc: Tensor, width: int) -> tuple[Tensor, Tensor]:
        """Top-`width` (values, indices) of a chunk's pre-activation. Values are float32: in low
        precision, a few more candidates are re-scored exactly from the float32 weights and
        re-ranked."""
        n = pre.shape[1]
        if not self.precision.low:
            return pre.topk(min(width, n), dim=1, sorted=False)
        idx = self.candidates(pre, min(low_precision_candidates(width), n))
        if self.precision.scaler is not None:
            self._note_overflow(pre.gather(1, idx))
        exact = values_grad(idx, self.sae.W_enc, xc).add_(self.sae.b_enc[idx])
        if idx.shape[1] > width:
            exact, pos = exact.topk(width, dim=1, sorted=False)
            idx = idx.gather(1, pos)
        return exact, idx

    def _note_overflow(self, t: Tensor) -> None:
        """fp16 only: remember that a low-precision result overflowed (the step is skipped).
        Sync-free, the flag stays on the device and is read once at the end of the step."""
        if self.precision.scaler is None:
            return
        if self.sync_free:
            bad = ~torch.isfinite(t).all()
            self._overflow_flag = bad if self._overflow_flag is None else self._overflow_flag | bad
        elif not bool(torch.isfinite(t).all()):
            self._overflow = True

    def _chunks(self, batch: int) -> list[slice]:
        rows = self.chunk_rows(batch)
        return [slice(lo, min(lo + rows, batch)) for lo in range(0, batch, rows)]

    @torch.no_grad()
    def __call__(self, x: Tensor, compute_fvu: bool = True) -> StepStats:
        """One step on normalised inputs x [batch, d]; `compute_fvu=False` skips the per-batch
        variance (only needed for logging) and reports fvu as NaN."""
        stats = self.run(x, compute_fvu, self.aux_width())
        self.finish(stats)
        return stats

    def aux_width(self) -> int | None:
        """The host's decision before a sync-free step: its dead block's width, from the dead
        count of an earlier step (`dead_block_width`), or None for the exact, synchronising
        AuxK path (not sync-free, or more dead latents than the block can hold)."""
        if not self.sync_free:
            return None
        seen = self._dead_seen.latest()
        if self._dead_seen.age >= DEAD_COUNT_MARGIN_STEPS:
            seen = None  # too old to bound this step's dead latents: the block's whole capacity
        if seen is not None and seen > self.dead_capacity:
            return None
        return dead_block_width(seen, self.cfg.n_latents, self.cfg.k_aux)

    def finish(self, stats: StepStats) -> None:
        """The host's part after a step's device work: the dead count starts its way to the
        host (read by a later `aux_width`), and fp16 reads its overflow flag."""
        if self.sync_free:  # (`run` counts dead_soon on every sync-free step)
            self._dead_seen.record(stats.dead_soon)
        if self._overflow_flag is not None:
            stats.overflow = bool(self._overflow_flag)  # fp16: the step's one host read

    @torch.no_grad()
    def run(self, x: Tensor, compute_fvu: bool, aux_width: int | None) -> StepStats:
        """The step's device work, given the host's decision (`aux_width`): with a width, no op
        in it reads on the host, so it traces as one graph (torch.compile, CUDA graphs)."""
        if aux_width is not None and not self.sync_free:
            raise ValueError("a dead-block width is for a sync-free step (see aux_width)")
        sae, cfg = self.sae, self.cfg
        W_enc, b_enc, b_pre = sae.W_enc, sae.b_enc, sae.b_pre
        self._overflow, self._overflow_flag = False, None

        # ---- encoder (the floor: one GEMM + selection per micro-batch), decoder, main loss ----
        xc = x - b_pre
        self.refresh_low_precision_()
        batch_threshold = None
        if self.activation.fixed_width:
            main, whole_pre = self._main_topk(x, xc)
        else:
            code, whole_pre, batch_threshold = self._select_ragged(x, xc)
            main = self._main_ragged(x, xc, code)
        # AuxK's top-k over the dead columns reads the whole-batch pre-activation (whole_pre);
        # with micro-batches it recomputes those columns in the same dtype (the same selection)
        self._update_tracker(main.fire_counts, x.shape[0])
        dead_soon = None
        if self.sync_free:  # an upper bound for the host's next decisions (see aux_width)
            margin = DEAD_COUNT_MARGIN_STEPS * x.shape[0]
            dead_soon = (self.tracker.tokens_since_fired >= self.tracker.threshold_tokens - margin).sum()
        fvu = (
            main.mse / self._batch_variance(x).clamp_min(1e-30)
            if compute_fvu
            else torch.full((), float("nan"), device=x.device)
        )

        # ---- AuxK on the dead latents ------------------------------------------------------
        auxk_loss = torch.zeros((), device=x.device)
        if aux_width is not None:
            n_dead, auxk_loss = self._auxk_fixed_block(whole_pre, main.err, xc, main.grad_b_enc, aux_width)
        else:
            dead_idx = self.tracker.dead_mask().nonzero().flatten()
            n_dead = int(dead_idx.numel())
            if self.tp is not None:
                n_dead = int(self.tp.all_reduce_(torch.tensor([n_dead], device=x.device)).item())
                if n_dead > 0 and cfg.auxk_coef > 0:
                    auxk_loss = self._auxk_tp(whole_pre, dead_idx, n_dead, main.err, xc, main.grad_b_enc)
            elif n_dead > 0 and cfg.auxk_coef > 0:
                auxk_loss = self._auxk(whole_pre, dead_idx, main.err, xc, main.grad_b_enc)
            n_dead = torch.tensor(n_dead)

        b_enc.grad.copy_(main.grad_b_enc)
        main.grad_b_pre -= self._reduce(main.grad_b_enc @ W_enc)  # the encoder's share, summed over shards
        b_pre.grad.copy_(main.grad_b_pre)

        mse_loss = self.mse_scale * main.mse
        loss = mse_loss + main.multi_loss + auxk_loss
        if main.penalty is not None:
            loss = loss + main.penalty
        return StepStats(
            loss,
            mse_loss,
            fvu,
            auxk_loss,
            main.multi_loss,
            main.l0,
            n_dead,
            main.fire_counts,
            overflow=self._overflow,
            penalty_loss=main.penalty,
            batch_threshold=batch_threshold,
            dead_soon=dead_soon,
        )

    def _main_topk(self, x: Tensor, xc: Tensor) -> tuple[_Main, Tensor | None]:
        """TopK (and Multi-TopK): each chunk's top-width entries, the exact global top-k under
        TP, then the main loss; returns it with the whole batch's pre-activation (one chunk only)."""
        cfg = self.cfg
        width = cfg.multi_k if cfg.multi_topk else cfg.k
        self.last_main_path = "fixed_width"
        parts = []
        for rows in self._chunks(x.shape[0]):
            pre = self.encode_chunk(xc[rows])
            parts.append(self.select(pre, xc[rows], width))
        raw_vals, idx = parts[0] if len(parts) == 1 else (torch.cat([p[i] for p in parts]) for i in (0, 1))
        whole_pre = pre if len(parts) == 1 else None
        if self.tp is None:
            return self._main_fixed_width(x, xc, idx, raw_vals.clamp_min(0), raw_vals), whole_pre
        # exact global top-k; entries of other ranks get value 0 here
        raw_vals, idx, owned = self.tp.global_topk(raw_vals, idx, width)
        vals = raw_vals.clamp_min(0) * owned
        if cfg.multi_topk:
            return self._main_fixed_width(x, xc, idx, vals, raw_vals), whole_pre
        rows, cols = owned.nonzero(as_tuple=True)  # row-major: entries grouped by token
        code = RaggedCode(rows, idx[rows, cols], vals[rows, cols], x.shape[0])
        return self._main_ragged(x, xc, code, l0=(raw_vals > 0).sum(1).float().mean()), whole_pre

    def _select_ragged(self, x: Tensor, xc: Tensor) -> tuple[RaggedCode, Tensor | None, Tensor | None]:
        """An activation without a fixed width (BatchTopK, ReLU): each chunk offers candidates,
        their float32 values are read (recomputed from the float32 weights in low precision),
        and the activation keeps a subset. Returns this rank's kept entries as a ragged code,
        the whole batch's pre-activation (one chunk only) and the batch threshold, if any."""
        act, W_enc, b_enc = self.activation, self.sae.W_enc, self.sae.b_enc
        batch = x.shape[0]
        budget = act.budget(self.cfg, batch * (self.dp.size if self.dp is not None else 1))
        count = budget if budget is None or not self.precision.low else low_precision_candidates(budget)
        row_parts, latent_parts, value_parts = [], [], []
        chunks = self._chunks(batch)
        for rows in chunks:
            pre = self.encode_chunk(xc[rows])
            cand = act.candidates(pre, count, self.cfg)
            row_parts.append(cand.rows + rows.start)
            latent_parts.append(cand.latents)
            if self.precision.low:
                self._note_overflow(pre[cand.rows, cand.latents])
            else:
                value_parts.append(pre[cand.rows, cand.latents])
        rows_all, latents = torch.cat(row_parts), torch.cat(latent_parts)
        if self.precision.low:  # which entries: low precision; how strongly: float32
            probe = RaggedCode(rows_all, latents, torch.zeros_like(latents, dtype=torch.float32), batch)
            values = probe.values_grad(W_enc, xc).add_(b_enc[latents])
        else:
            values = torch.cat(value_parts).float()
        keep, cut = act.keep(values, budget, self._gather_batch)
        code = RaggedCode(rows_all[keep], latents[keep], values[keep], batch)
        return code, (pre if len(chunks) == 1 else None), cut

    def _gather_batch(self, t: Tensor) -> Tensor:
        """A 1-D tensor from every rank that shares this batch (the TP group, then the replicas)."""
        if self.tp is not None:
            t = self.tp.all_gather_cat(t[None])[0]
        if self.dp is not None:
            t = self.dp.all_gather_cat(t[None])[0]
        return t

    def dead_topk(
        self, pre: Tensor | None, xc: Tensor, dead_idx: Tensor, k: int, encoder: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Each row of xc's top-k over the dead latents: (float32 values, this rank's latent
        indices). Read from `pre` (the pre-activation of the same rows) when given, else
        recomputed from the dead rows of the encoder only (`encoder`, from `_dead_encoder`;
        O(rows * n_dead * d))."""
        if pre is not None:
            vals, local = pre.index_select(1, dead_idx).topk(k, dim=1, sorted=False)
        else:
            w_dead, b_dead = encoder if encoder is not None else self._dead_encoder(dead_idx)
            vals, local = torch.addmm(b_dead, xc.to(w_dead.dtype), w_dead.t()).topk(k, dim=1, sorted=False)
        self._note_overflow(vals)
        return vals.float(), dead_idx[local]

    def _dead_topk_chunked(self, pre: Tensor | None, xc: Tensor, dead_idx: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """`dead_topk` over the whole batch: from the whole pre-activation, or per micro-batch."""
        if pre is not None:
            return self.dead_topk(pre, xc, dead_idx, k)
        encoder = self._dead_encoder(dead_idx)
        parts = [self.dead_topk(None, xc[rows], dead_idx, k, encoder) for rows in self._chunks(xc.shape[0])]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _dead_encoder(self, dead_idx: Tensor) -> tuple[Tensor, Tensor]:
        """The dead latents' encoder rows and biases in the GEMM's dtype, so recomputed dead
        columns are those of the pre-activation (`sae.aux_precision` is the dense dead block's)."""
        if self.precision.low:
            assert self._w_enc_low is not None
            rows = self._w_enc_low.index_select(0, dead_idx)
            return rows[:, :-1], rows[:, -1]
        return self.sae.W_enc.index_select(0, dead_idx), self.sae.b_enc.index_select(0, dead_idx)

    def _main_fixed_width(self, x: Tensor, xc: Tensor, idx: Tensor, vals: Tensor, raw_vals: Tensor) -> _Main:
        """Main loss (and Multi-TopK) from the [batch, width] code; writes W_dec.grad and
        W_enc.grad. Under TP (with Multi-TopK), entries of other ranks carry value 0."""
        cfg, W_dec, W_enc, b_pre, n = self.cfg, self.sae.W_dec, self.sae.W_enc, self.sae.b_pre, self.cfg.n_latents
        denom = x.numel()
        if cfg.multi_topk:
            _, pos = raw_vals.topk(cfg.k, dim=1, sorted=False)
            main_idx, main_vals, main_raw = idx.gather(1, pos), vals.gather(1, pos), raw_vals.gather(1, pos)
        else:
            pos, main_idx, main_vals, main_raw = None, idx, vals, raw_vals

        ops = self.ops
        order_main = LatentOrder(main_idx, n)
        err = self._reduce(ops.decode(main_idx, main_vals, W_dec)).add_(b_pre).sub_(x)  # x_hat - x
        mse = _mean_sq(err)
        grad_x_hat = err * (2.0 * self.mse_scale / denom)
        fired_mask = main_vals > 0  # this rank's latents that fired
        fire_counts = _fire_counts(main_idx, fired_mask, n)
        # one embedding_bag call per gradient, no host read of the offsets (sync-free, when it fits)
        whole = self.sync_free and whole_bag_fits(main_idx.numel(), x.shape[1])

        # gradient w.r.t. the encoder values at `idx` (width entries per token)
        g_main = ops.values_grad(main_idx, W_dec, grad_x_hat) * fired_mask
        ops.rows_by_latent_(W_dec.grad, order_main, main_vals, grad_x_hat, accumulate=False, sync_free=whole)
        grad_b_pre = grad_x_hat.sum(0)

        multi_loss = torch.zeros((), device=x.device)
        if cfg.multi_topk:
            order_wide = LatentOrder(idx, n)
            err_wide = self._reduce(sparse_decode(idx, vals, W_dec)).add_(b_pre).sub_(x)
            multi_loss = self.mse_scale * _mean_sq(err_wide) / 8
            grad_wide_out = err_wide * (2.0 * self.mse_scale / (8 * denom))
            g_enc = values_grad(idx, W_dec, grad_wide_out) * (vals > 0)
            g_enc.scatter_add_(1, pos, g_main)
            rows_by_latent_(W_dec.grad, order_wide, vals, grad_wide_out, accumulate=True)
            grad_b_pre += grad_wide_out.sum(0)
            enc_idx, enc_order = idx, order_wide
        else:
            g_enc, enc_idx, enc_order = g_main, main_idx, order_main

        # encoder gradients from the active entries
        ops.rows_by_latent_(W_enc.grad, enc_order, g_enc, xc, accumulate=False, sync_free=whole)
        l0 = (main_raw > 0).sum(1).float().mean()
        return _Main(err, mse, multi_loss, latent_sums(enc_idx, g_enc, n), grad_b_pre, fire_counts, l0)

    def _main_ragged(self, x: Tensor, xc: Tensor, code: RaggedCode, l0: Tensor | None = None) -> _Main:
        """Main loss (and the activation's penalty) from a ragged code of this rank's entries: a
        TopK rank's owned share under TP (about k / tp per token, so the O(batch * k * d) work is
        split across the TP group), or BatchTopK's / ReLU's kept entries. Writes W_dec.grad and
        W_enc.grad. `l0` when the caller knows it (TopK), else counted over the TP group."""
        W_enc, W_dec, b_pre, n = self.sae.W_enc, self.sae.W_dec, self.sae.b_pre, self.cfg.n_latents
        rows = x.shape[0]
        z = None
        if code.latents.numel() >= DENSE_CODE_FRACTION * rows * n:  # a dense-ish code: GEMMs
            z = torch.zeros(rows, n, dtype=W_dec.dtype, device=x.device)
            z.index_put_((code.rows, code.latents), code.values.to(W_dec.dtype))
        self.last_main_path = "ragged" if z is None else "dense"
        err = self._reduce(code.decode(W_dec) if z is None else z @ W_dec).add_(b_pre).sub_(x)
        mse = _mean_sq(err)
        grad_x_hat = err * (2.0 * self.mse_scale / x.numel())
        active = code.values > 0
        fire_counts = _fire_counts(code.latents, active, n)
        penalty = None
        penalty_grad = self.activation.penalty_grad(self.cfg, rows)
        if penalty_grad or l0 is None:  # one all-reduce of the code's sum and its count
            totals = self._reduce(torch.stack([code.values.sum(), active.sum().float()]))
            l0 = totals[1] / rows if l0 is None else l0
            if penalty_grad:
                penalty = totals[0] * penalty_grad
        if z is not None:
            mask = z > 0
            g_dense = (grad_x_hat @ W_dec.t()).mul_(mask)
            if penalty_grad:
                g_dense.add_(mask, alpha=penalty_grad)
            torch.mm(z.t(), grad_x_hat, out=W_dec.grad)
            torch.mm(g_dense.t(), xc, out=W_enc.grad)
            grad_b_enc = g_dense.sum(0)
        else:
            g_enc = code.values_grad(W_dec, grad_x_hat) * active
            if penalty_grad:
                g_enc += active * penalty_grad
            order = LatentOrder(code.latents, n, rows=code.rows)
            rows_by_latent_(W_dec.grad, order, code.values, grad_x_hat, accumulate=False)
            rows_by_latent_(W_enc.grad, order, g_enc, xc, accumulate=False)
            grad_b_enc = latent_sums(code.latents, g_enc, n)
        return _Main(
            err, mse, torch.zeros((), device=x.device), grad_b_enc, grad_x_hat.sum(0), fire_counts, l0, penalty
        )

    def _aux_loss(self, aux_err: Tensor, var_res: Tensor, gate: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """AuxK loss from e_hat - e, and its gradient w.r.t. e_hat (None when the loss is not
        finite: the paper zeroes a NaN AuxK loss, so that step gets no AuxK gradient). With
        `gate` (the sync-free step: false when no latent is dead) nothing is read on the host:
        a loss that is not finite, or a closed gate, gives a zero loss and a zero gradient."""
        aux = self.cfg.auxk_coef * _mean_sq(aux_err) / var_res
        if gate is None and not torch.isfinite(aux):
            return torch.zeros((), device=aux_err.device), None
        grad = aux_err * (2.0 * self.cfg.auxk_coef / (aux_err.numel() * var_res))
        if gate is None:
            return aux, grad
        use = torch.isfinite(aux) & gate
        return torch.where(use, aux, 0.0), torch.where(use, grad, 0.0)

    def _auxk_fixed_block(
        self, pre: Tensor | None, err: Tensor, xc: Tensor, grad_b_enc: Tensor, width: int
    ) -> tuple[Tensor, Tensor]:
        """Sync-free AuxK (one TP rank): the dense dead block over `width` columns (`dead_slots`:
        the first `width` dead latents, padding inactive). Returns (dead count, AuxK loss); with
        no dead latent the loss and gradients are zero, as on the synchronising path."""
        cfg, sae = self.cfg, self.sae
        dead_idx, valid, n_dead = dead_slots(self.tracker.dead_mask(), width)
        if cfg.auxk_coef <= 0:
            return n_dead, torch.zeros((), device=xc.device)
        k_aux = min(cfg.k_aux, width)
        self.last_aux_path = "fixed_block"
        residual = -err
        block = DeadBlock(pre, xc, sae.W_enc, sae.b_enc, dead_idx, k_aux, self.aux_dtype, valid=valid)
        # padding slots point at latent 0 with all-zero rows: adding them changes nothing
        aux = self._block_auxk(block, dead_idx, residual, self._batch_variance(residual), xc, grad_b_enc, n_dead > 0)
        return n_dead, aux

    def _batch_variance(self, t: Tensor) -> Tensor:
        """`_variance` over the whole batch: with data parallelism, from the replicas' summed
        squares and sums (one all-reduce of d + 1 numbers)."""
        if self.dp is None:
            return _variance(t)
        flat = t.reshape(-1)
        sums = torch.cat([torch.dot(flat, flat).reshape(1), t.sum(0)])
        self.dp.all_reduce_(sums)
        rows = t.shape[0] * self.dp.size
        mean = sums[1:] / rows
        return sums[0] / (rows * t.shape[1]) - torch.dot(mean, mean) / mean.numel()

    def _update_tracker(self, fire_counts: Tensor, batch: int) -> None:
        """Advance the dead-latent counters by the whole batch: under data parallelism a latent
        fired if it fired on any replica (an all-reduce MAX of a byte per local latent)."""
        if self.dp is None:
            self.tracker.update_mask(fire_counts > 0, batch)
            return
        mask = (fire_counts > 0).to(torch.uint8)
        self.dp.all_reduce_(mask, op=torch.distributed.ReduceOp.MAX)
        self.tracker.update_mask(mask.bool(), batch * self.dp.size)

    def _reduce(self, partial: Tensor) -> Tensor:
        """Sum a partial result over the TP group (identity without TP)."""
        return partial if self.tp is None else self.tp.all_reduce_(partial)

    def _auxk_tp(
        self, pre: Tensor | None, dead_idx: Tensor, n_dead: int, err: Tensor, xc: Tensor, grad_b_enc: Tensor
    ) -> Tensor:
        """AuxK with latent-sharded weights: exact global top-k_aux over every rank's dead
        latents, per micro-batch (each rank offers its top-min(k_aux, its dead) candidates,
        padded to the largest rank's count, so a healthy run with few dead latents gathers
        little), then each rank decodes and back-propagates only the entries it owns (a ragged
        code, about k_aux / tp per token)."""
        assert self.tp is not None
        k_aux = min(self.cfg.k_aux, n_dead)
        local_counts = self.tp.all_gather_cat(torch.tensor([[int(dead_idx.numel())]], device=xc.device))
        width = min(k_aux, int(local_counts.max()))  # candidates each rank offers (padded)
        k_local = min(width, int(dead_idx.numel()))
        encoder = self._dead_encoder(dead_idx) if pre is None and k_local > 0 else None
        rows_parts, latent_parts, value_parts = [], [], []
        for rows in self._chunks(xc.shape[0]):
            chunk = rows.stop - rows.start
            cand_vals = torch.full((chunk, width), float("-inf"), device=xc.device)
            cand_idx = torch.full((chunk, width), -1, dtype=torch.long, device=xc.device)
            if k_local > 0:
                chunk_pre = None if pre is None else pre[rows]
                cand_vals[:, :k_local], cand_idx[:, :k_local] = self.dead_topk(
                    chunk_pre, xc[rows], dead_idx, k_local, encoder
                )
            raw, local, owned = self.tp.global_topk(cand_vals, cand_idx, min(k_aux, width * self.tp.size))
            keep = owned & (raw > 0)  # entries at or below 0 add nothing and get no gradient (ReLU)
            r, c = keep.nonzero(as_tuple=True)
            rows_parts.append(r + rows.start)
            latent_parts.append(local[r, c])
            value_parts.append(raw[r, c])
        code = RaggedCode(torch.cat(rows_parts), torch.cat(latent_parts), torch.cat(value_parts), xc.shape[0])
        self.last_aux_path = "tp_ragged"
        residual = -err
        return self._auxk_ragged(code, residual, self._batch_variance(residual), xc, grad_b_enc)

    def _auxk(self, pre: Tensor | None, dead_idx: Tensor, err: Tensor, xc: Tensor, grad_b_enc: Tensor) -> Tensor:
        """AuxK loss; adds its gradients to W_dec.grad, W_enc.grad and grad_b_enc. err = x_hat - x."""
        cfg, sae = self.cfg, self.sae
        k_aux = min(cfg.k_aux, int(dead_idx.numel()))
        residual = -err
        var_res = self._batch_variance(residual)
        if use_dense_block(int(dead_idx.numel()), k_aux):
            block = DeadBlock(pre, xc, sae.W_enc, sae.b_enc, dead_idx, k_aux, self.aux_dtype)
            if block.sparse_enough():
                self.last_aux_path = "ragged"
                return self._auxk_ragged(block.ragged(dead_idx), residual, var_res, xc, grad_b_enc)
            self.last_aux_path = "dense_topk" if block.used_topk else "dense"
            return self._block_auxk(block, dead_idx, residual, var_res, xc, grad_b_enc)
        self.last_aux_path = "sparse_topk"
        raw, aux_idx = self._dead_topk_chunked(pre, xc, dead_idx, k_aux)
        return self._auxk_fixed_width(aux_idx, raw.clamp_min(0), residual, xc, grad_b_enc, var_res)

    def _block_auxk(
        self,
        block: DeadBlock,
        dead_idx: Tensor,
        residual: Tensor,
        var_res: Tensor,
        xc: Tensor,
        grad_b_enc: Tensor,
        gate: Tensor | None = None,
    ) -> Tensor:
        """AuxK through a dense dead block: its loss, with its gradients added to W_dec.grad,
        W_enc.grad and grad_b_enc at `dead_idx` (`gate`: see `_aux_loss`)."""
        W_dec = self.sae.W_dec
        w_dead = W_dec.index_select(0, dead_idx)
        decoded = block.decode(w_dead)
        if block.dtype == torch.float16:
            self._note_overflow(decoded)
        aux, grad_e_hat = self._aux_loss(decoded.sub_(residual), var_res, gate)
        if grad_e_hat is None:
            return aux
        g_wdec, g_wenc, g_benc = self._scaled_block_backward(block, grad_e_hat, w_dead, xc)
        W_dec.grad.index_add_(0, dead_idx, g_wdec)
        self.sae.W_enc.grad.index_add_(0, dead_idx, g_wenc)
        grad_b_enc.index_add_(0, dead_idx, g_benc)
        return aux

    def _scaled_block_backward(
        self, block: DeadBlock, grad_e_hat: Tensor, w_dead: Tensor, xc: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The dead block's backward; in fp16 under the loss scale (its products would underflow
        unscaled), unscaled in float32 and checked for overflow."""
        if block.dtype != torch.float16:
            return block.backward(grad_e_hat, w_dead, xc)
        scale = self.precision.scale
        grads = block.backward(grad_e_hat * scale, w_dead, xc)
        for g in grads:
            g.div_(scale)
            self._note_overflow(g)
        return grads

    def _auxk_fixed_width(
        self,
        aux_idx: Tensor,
        aux_vals: Tensor,
        residual: Tensor,
        xc: Tensor,
        grad_b_enc: Tensor,
        var_res: Tensor | None = None,
    ) -> Tensor:
        """AuxK loss and gradients through the sparse kernels for a [batch, k_aux] code over this
        rank's latents (entries owned by other TP ranks carry value 0)."""
        cfg, W_enc, W_dec = self.cfg, self.sae.W_enc, self.sae.W_dec
        if var_res is None:  # the caller may have it already (one all-reduce under DP)
            var_res = self._batch_variance(residual)
        aux, grad_e_hat = self._aux_loss(self._reduce(sparse_decode(aux_idx, aux_vals, W_dec)).sub_(residual), var_res)
        if grad_e_hat is None:
            return aux
        order = LatentOrder(aux_idx, cfg.n_latents)
        g_aux = values_grad(aux_idx, W_dec, grad_e_hat) * (aux_vals > 0)
        rows_by_latent_(W_dec.grad, order, aux_vals, grad_e_hat, accumulate=True)
        rows_by_latent_(W_enc.grad, order, g_aux, xc, accumulate=True)
        grad_b_enc.add_(latent_sums(aux_idx, g_aux, cfg.n_latents))
        return aux

    def _auxk_ragged(
        self, code: RaggedCode, residual: Tensor, var_res: Tensor, xc: Tensor, grad_b_enc: Tensor
    ) -> Tensor:
        """AuxK through the sparse kernels from a ragged code of positive entries (few active
        dead entries per token, or a TP rank's own entries: the decode is summed over shards)."""
        cfg, W_enc, W_dec = self.cfg, self.sae.W_enc, self.sae.W_dec
        aux, grad_e_hat = self._aux_loss(self._reduce(code.decode(W_dec)).sub_(residual), var_res)
        if grad_e_hat is None:
            return aux
        order = LatentOrder(code.latents, cfg.n_latents, rows=code.rows)
        g_aux = code.values_grad(W_dec, grad_e_hat)  # every entry is positive: ReLU passes it
        rows_by_latent_(W_dec.grad, order, code.values, grad_e_hat, accumulate=True)
        rows_by_latent_(W_enc.grad, order, g_aux, xc, accumulate=True)
        grad_b_enc.index_add_(0, code.latents, g_aux)
        return aux
