"""Training precision: which dtype the O(batch * n_latents) work runs in, and fp16's loss scale.

The encoder GEMM and its top-k are the whole floor of a step (`train.step`); they run in the
compute dtype. Master weights, gradients, Adam and EMA state stay float32, and so do the sparse
O(batch * k * d) products, whose cost is a small share of a step. Selected values are
recomputed in float32 from the float32 weights, so a low-precision GEMM only decides *which*
latents fire, not how strongly.

fp16 has too little range for the AuxK backward's products (a gradient of ~1e-7 underflows), so
fp16 runs carry a dynamic loss scale: gradients entering low-precision products are multiplied
by `scale`, a non-finite result skips the step on every rank and halves the scale, and after
`growth_interval` clean steps it doubles. Every rank takes the same decision (the trainer agrees
on the overflow flag first), so the scale is the same everywhere without being communicated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saescale.kernels.dead_block import cpu_has_fast_bf16

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 at (at least) its float32 rate."""
    if device.type == "cuda":  # tensor-core bf16 from Ampere (sm_80) on; older GPUs emulate it
        return torch.cuda.get_device_properties(device).major >= 8
    return device.type == "cpu" and cpu_has_fast_bf16()


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 where the hardware multiplies it natively, else fp32; others as given."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


@dataclass
class LossScaler:
    """Dynamic loss scale for fp16 (the GradScaler rule: halve on overflow, double after
    `growth_interval` clean steps). `update` must see the overflow flag agreed by all ranks."""

    scale: float = 2.0**16
    growth_interval: int = 2000
    backoff: float = 0.5
    growth: float = 2.0
    clean_steps: int = 0
    skipped_steps: int = 0

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale = max(self.scale * self.backoff, 1.0)
            self.clean_steps = 0
            self.skipped_steps += 1
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale = min(self.scale * self.growth, 2.0**24)
            self.clean_steps = 0

    def state_dict(self) -> dict[str, float | int]:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        self.skipped_steps = int(state["skipped_steps"])


@dataclass(frozen=True)
class Precision:
    """What a step needs to know: the compute dtype, and fp16's loss scaler (None otherwise)."""

    name: str  # fp32 | bf16 | fp16 (resolved)
    scaler: LossScaler | None = None

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    @property
    def low(self) -> bool:
        return self.name != "fp32"

    @property
    def scale(self) -> float:
        return self.scaler.scale if self.scaler is not None else 1.0

    @classmethod
    def make(cls, precision: str, device: torch.device) -> Precision:
        name = resolve_precision(precision, device)
        return cls(name, LossScaler() if name == "fp16" else None)
