"""Configuration of the autoencoder and of its training, validated on construction.

Every knob of the Gao et al. (2024) recipe lives here with the paper's default, so a run
is described completely by these two dataclasses (they are saved in every checkpoint).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

Normalization = Literal["none", "dataset_scale", "token_unit_norm", "layer_norm"]
Architecture = Literal["topk", "batchtopk", "relu"]
ARCHITECTURES = ("topk", "batchtopk", "relu")  # one module each in saescale.core.arch
AuxPrecision = Literal["auto", "float32", "bfloat16"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


NEVER = 10**9  # an interval in steps that no run reaches: `log_every=NEVER` never logs
NEVER_DEAD = 10**12  # a dead_tokens_threshold no run reaches: no latent is ever dead (benchmarks)


def default_k_aux(d_in: int) -> int:
    """The paper's k_aux: a power of two close to d_model / 2 (nearest in log scale)."""
    half = max(d_in / 2, 1.0)
    return int(2 ** round(math.log2(half)))


def _check_interval(name: str, value: Any) -> None:
    """An every-N-steps setting must be a whole number of steps >= 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


class _DictConfig:
    """to_dict/from_dict for the config dataclasses; unknown keys are an error, not ignored."""

    _section = "config"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown {cls._section} config keys: {sorted(unknown)}")
        return cls(**data)


@dataclass
class SAEConfig(_DictConfig):
    """Architecture of a sparse autoencoder; TopK (Gao et al. 2024, section 2.3) by default.

    encoder: z = ReLU(TopK_k(W_enc (x - b_pre) + b_enc)); decoder: x_hat = W_dec z + b_pre.
    `architecture` swaps the activation (see `saescale.core.arch`):
      batchtopk: the top k * batch pre-activations of the whole batch (Bussmann et al. 2024);
                 at inference a JumpReLU at a threshold estimated during training
      relu:      z = ReLU(pre) with an L1 penalty (the paper's baseline, section 2.2); `k` only
                 sets the test-time TopK that `encode(x, k)` may ask for
    """

    _section = "sae"

    d_in: int
    n_latents: int
    k: int
    architecture: Architecture = "topk"
    # ReLU's sparsity penalty: l1_coef * mean over tokens of sum_i z_i ||W_dec,i|| (decoder rows
    # are kept at unit norm, so this is the plain L1 of the code; see saescale.core.arch.relu)
    l1_coef: float = 0.0
    # AuxK dead-latent loss (section A.2): top-k_aux dead latents model the detached residual.
    k_aux: int | None = None  # None -> power of two near d_in / 2
    auxk_coef: float = 1 / 32
    dead_tokens_threshold: int = 10_000_000  # a latent is dead after this many tokens without firing
    # Multi-TopK (section 5.3): loss L(k) + L(multi_topk_factor * k) / 8.
    multi_topk: bool = False
    multi_topk_factor: int = 4
    # Input normalisation, stored with the weights and applied at inference.
    #   dataset_scale: one scalar so that E||x||^2 = d_in (computed once from a data sample)
    #   token_unit_norm: the paper's per-token (x - mean_d x) / ||x - mean_d x||
    #   layer_norm: OpenAI's released SAEs' (x - mean_d x) / (std_d x + 1e-5), std unbiased
    normalization: Normalization = "dataset_scale"
    # Precision of the AuxK matmuls over the dense dead-latent block. "auto" follows
    # train.precision when that is bf16/fp16, else bfloat16 where the hardware multiplies it
    # natively (CUDA, CPUs with AMX/AVX512-BF16) and float32 elsewhere. (AuxK's sparse top-k reads
    # the step's own pre-activation, in train.precision.)
    aux_precision: AuxPrecision = "auto"

    def __post_init__(self) -> None:
        for name in ("d_in", "n_latents", "k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"sae.{name} must be a positive integer, got {value!r}")
        if self.k > self.n_latents:
            raise ConfigError(f"sae.k={self.k} is larger than sae.n_latents={self.n_latents}; lower k or add latents")
        if self.k_aux is None:
            self.k_aux = min(default_k_aux(self.d_in), self.n_latents)
        if not isinstance(self.k_aux, int) or self.k_aux <= 0 or self.k_aux > self.n_latents:
            raise ConfigError(f"sae.k_aux must be in [1, n_latents={self.n_latents}], got {self.k_aux!r}")
        if self.auxk_coef < 0 or not math.isfinite(self.auxk_coef):
            raise ConfigError(f"sae.auxk_coef must be a finite number >= 0, got {self.auxk_coef!r}")
        if self.dead_tokens_threshold <= 0:
            raise ConfigError(f"sae.dead_tokens_threshold must be > 0, got {self.dead_tokens_threshold!r}")
        if self.multi_topk and self.multi_topk_factor * self.k > self.n_latents:
            raise ConfigError(
                f"sae.multi_topk needs multi_topk_factor*k={self.multi_topk_factor * self.k} <= "
                f"n_latents={self.n_latents}; disable multi_topk or lower k"
            )
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"sae.architecture must be one of {', '.join(ARCHITECTURES)}; got {self.architecture!r}")
        if self.multi_topk and self.architecture != "topk":
            raise ConfigError(
                f"sae.multi_topk is a TopK loss (L(k) + L(4k)/8); sae.architecture={self.architecture} has no "
                "per-token k to widen: set sae.multi_topk=false"
            )
        if not math.isfinite(self.l1_coef) or self.l1_coef < 0:
            raise ConfigError(f"sae.l1_coef must be a finite number >= 0, got {self.l1_coef!r}")
        if self.architecture != "relu" and self.l1_coef != 0:
            raise ConfigError(f"sae.l1_coef is ReLU's penalty; sae.architecture={self.architecture} sets L0 by k")
        if self.multi_topk_factor < 2:
            raise ConfigError(f"sae.multi_topk_factor must be >= 2, got {self.multi_topk_factor!r}")
        if self.normalization not in ("none", "dataset_scale", "token_unit_norm", "layer_norm"):
            raise ConfigError(
                f"sae.normalization must be one of none, dataset_scale, token_unit_norm, layer_norm; got {self.normalization!r}"
            )
        if self.aux_precision not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"sae.aux_precision must be auto, float32 or bfloat16; got {self.aux_precision!r}")

    @property
    def multi_k(self) -> int:
        return self.multi_topk_factor * self.k


# The budget lr rule (TrainConfig.lr_rule="budget"; the sweep behind it is docs/paper's lr section).
# The paper's 2e-4 / sqrt(N / 2^14) is meant for runs trained to convergence; on short runs the best
# lr measured here is a larger multiple of it, larger for more latents and fewer tokens:
#   multiplier = (BUDGET_REF_TOKENS / T) ** BUDGET_TOKEN_EXPONENT * (N / 2^14) ** BUDGET_N_EXPONENT,
# never below 1 (a long run keeps the paper's rule) nor above BUDGET_MAX_MULTIPLIER.
BUDGET_REF_TOKENS = 8.6e7
BUDGET_TOKEN_EXPONENT = 0.39
BUDGET_N_EXPONENT = 0.25
BUDGET_MAX_MULTIPLIER = 16.0


def budget_lr_multiplier(tokens: int, n_latents: int) -> float:
    """How many times the paper's lr a run of `tokens` training tokens and `n_latents` latents
    takes by default."""
    raw = (BUDGET_REF_TOKENS / tokens) ** BUDGET_TOKEN_EXPONENT * (n_latents / 2**14) ** BUDGET_N_EXPONENT
    return min(BUDGET_MAX_MULTIPLIER, max(1.0, raw))


@dataclass
class TrainConfig(_DictConfig):
    """Optimisation settings (section A of the paper): Adam, constant lr by default."""

    _section = "train"

    lr: float | None = None  # None -> the rule below (`resolved_lr`)
    # the default lr's rule: "budget" (the paper's 1/sqrt(n) law, raised for runs too short to
    # converge, from the run's budget_tokens) or "paper" (2e-4 / sqrt(n_latents / 2**14) as is)
    lr_rule: str = "budget"
    # multiplies the rule's lr (an lr sweep in multiples of the rule, as the paper's experiments
    # run it); an explicit lr is taken as it is
    lr_scale: float = 1.0
    budget_tokens: int | None = None  # tokens the run will train on (the train job sets it)
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 6.25e-10
    warmup_steps: int = 0
    decay_start_frac: float | None = None  # linear decay to 0 from this fraction of total_steps
    total_steps: int | None = None
    clip_grad_norm: float | None = None
    ema_decay: float | None = None  # e.g. 0.999; the bias-corrected EMA is used for eval/export
    seed: int = 0
    geometric_median_samples: int = 32768
    init_transpose: bool = True  # W_enc = W_dec^T at init (then untied)
    log_every: int = 10
    histogram_every: int = 200
    # steps between checkpoints; "auto": the Young/Daly interval from each checkpoint's measured
    # stall and checkpoint_mtbf_s (`train.cadence`); None: no periodic checkpoints
    checkpoint_every: int | str | None = None
    checkpoint_mtbf_s: float = 86_400.0  # expected seconds between failures, for checkpoint_every=auto
    # Compute dtype of the encoder GEMM and top-k (weights, grads and Adam stay float32):
    # fp32 | bf16 | fp16 | auto (bf16 where the hardware multiplies it natively, else fp32).
    precision: str = "auto"
    # Row chunks per step for the O(batch * n_latents) work: an integer >= 1, or "auto" (the
    # memory planner picks the fewest that fit the device). The step stays the batch-level step.
    micro_batches: int | str = 1
    # A step with no host synchronisation (`train.step.SparseTopKStep`): auto (on for a CUDA
    # TopK step in one process) | on | off. Losses and counts are then read at log steps only.
    sync_free: str = "auto"
    # The TopK code's sparse products: auto (= torch until a GPU measures Triton faster,
    # `saescale bench kernels`) | torch (embedding_bag) | triton (CUDA; the `kernels` extra).
    sparse_kernels: str = "auto"
    # The sync-free step's device work compiled as one graph (`train.graphs`): auto | on | off.
    # On CUDA: torch.compile with CUDA graphs; on a CPU "on" compiles with inductor (no graphs).
    cuda_graphs: str = "auto"

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"train.precision must be one of auto, fp32, bf16, fp16; got {self.precision!r}")
        if self.sync_free not in ("auto", "on", "off"):
            raise ConfigError(f"train.sync_free must be auto, on or off; got {self.sync_free!r}")
        if self.cuda_graphs not in ("auto", "on", "off"):
            raise ConfigError(f"train.cuda_graphs must be auto, on or off; got {self.cuda_graphs!r}")
        if self.sparse_kernels not in ("auto", "torch", "triton"):
            raise ConfigError(f"train.sparse_kernels must be auto, torch or triton; got {self.sparse_kernels!r}")
        if self.micro_batches != "auto" and (
            not isinstance(self.micro_batches, int) or isinstance(self.micro_batches, bool) or self.micro_batches < 1
        ):
            raise ConfigError(f"train.micro_batches must be an integer >= 1 or 'auto', got {self.micro_batches!r}")
        if self.lr_rule not in ("budget", "paper"):
            raise ConfigError(f"train.lr_rule must be budget or paper, got {self.lr_rule!r}")
        if self.budget_tokens is not None and (
            not isinstance(self.budget_tokens, int) or isinstance(self.budget_tokens, bool) or self.budget_tokens < 1
        ):
            raise ConfigError(f"train.budget_tokens must be a positive integer, got {self.budget_tokens!r}")
        if self.lr is not None and (not math.isfinite(self.lr) or self.lr <= 0):
            raise ConfigError(f"train.lr must be a positive number, got {self.lr!r}")
        if not isinstance(self.lr_scale, (int, float)) or not math.isfinite(self.lr_scale) or self.lr_scale <= 0:
            raise ConfigError(f"train.lr_scale must be a positive number, got {self.lr_scale!r}")
        if self.lr is not None and self.lr_scale != 1.0:
            raise ConfigError("train.lr_scale multiplies the lr rule's value; with train.lr set, leave it at 1")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"train.{name} must be in [0, 1), got {value!r}")
        if self.eps <= 0:
            raise ConfigError(f"train.eps must be > 0, got {self.eps!r}")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if self.decay_start_frac is not None:
            if not 0.0 <= self.decay_start_frac < 1.0:
                raise ConfigError(f"train.decay_start_frac must be in [0, 1), got {self.decay_start_frac!r}")
            if not self.total_steps:
                raise ConfigError("train.decay_start_frac needs train.total_steps to know when to decay")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise ConfigError(f"train.clip_grad_norm must be > 0, got {self.clip_grad_norm!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in (0, 1), got {self.ema_decay!r}")
        # the trainer takes `step % every`: 0 would divide by zero, a negative value is meaningless
        for name in ("log_every", "histogram_every"):
            _check_interval(f"train.{name}", getattr(self, name))
        if self.checkpoint_every is not None and self.checkpoint_every != "auto":  # None: no periodic checkpoints
            if isinstance(self.checkpoint_every, str):
                raise ConfigError(
                    f"train.checkpoint_every must be an integer >= 1 or 'auto', got {self.checkpoint_every!r}"
                )
            _check_interval("train.checkpoint_every", self.checkpoint_every)
        if not isinstance(self.checkpoint_mtbf_s, (int, float)) or not self.checkpoint_mtbf_s > 0:
            raise ConfigError(
                f"ray.mtbf_s (train.checkpoint_mtbf_s) must be > 0 seconds, got {self.checkpoint_mtbf_s!r}"
            )

    def resolved_lr(self, n_latents: int) -> float:
        """`lr` when set; else the paper's rule, times `budget_lr_multiplier` under the budget rule,
        times `lr_scale`."""
        if self.lr is not None:
            return self.lr
        paper = 2e-4 / math.sqrt(n_latents / 2**14)
        if self.lr_rule == "paper" or self.budget_tokens is None:
            return self.lr_scale * paper
        return self.lr_scale * paper * budget_lr_multiplier(self.budget_tokens, n_latents)
