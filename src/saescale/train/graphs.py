"""Launch overhead: the sync-free step's device work compiled as one graph (`train.cuda_graphs`).

At GPU speeds a TopK step of a few milliseconds is a hundred-odd small kernels, each launched
from Python; the launches, not the arithmetic, can set the pace. Once the step reads nothing on
the host (`SparseTopKStep.run` with a dead-block width: tests/test_sync_free.py), it traces as a
single graph, so `torch.compile(fullgraph=True)` takes it whole: inductor fuses the elementwise
work and, on CUDA with mode="reduce-overhead", records the kernels in a CUDA graph that one
launch replays. Log steps (which also compute the FVU) and steps on the exact AuxK path run eager,
on the same parameters and buffers. One compiled variant per dead-block width (a handful of
powers of two).

Tensors the graph writes in place (gradients, the dead-latent counters, the step's reused
buffers) are marked as static addresses, so CUDA graphs write them where the eager step does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saescale.train.step import SparseTopKStep, StepStats

_FIELDS = ("loss", "mse_loss", "fvu", "auxk_loss", "multi_topk_loss", "l0", "n_dead", "fire_counts", "dead_soon")


# `train.cuda_graphs=auto` compiles a sync-free CUDA step once a GPU has measured it faster than
# the eager step (bench/gpu_check.sh's step variants); none has yet, so auto stays eager.
AUTO_ON_CUDA = False


def _why_not_compiled(step: SparseTopKStep) -> str | None:
    """Why a step cannot be compiled as one graph, or None (a DP step is never sync-free)."""
    if not step.sync_free:
        return "needs a sync-free step (train.sync_free: a TopK step in one process, not Multi-TopK)"
    if step.precision.scaler is not None:
        return "does not take fp16 (its overflow check reads on the host every step)"
    return None


def resolve_cuda_graphs(setting: str, step: SparseTopKStep) -> bool:
    """`train.cuda_graphs`: on = compile wherever the step is sync-free (on a CPU: inductor's C++
    code, no CUDA graphs); off = eager; auto = on for a sync-free CUDA step when AUTO_ON_CUDA."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"train.cuda_graphs must be auto, on or off, got {setting!r}")
    if setting == "off":
        return False
    why_not = _why_not_compiled(step)
    if why_not is not None:
        if setting == "on":
            raise ValueError(f"train.cuda_graphs=on {why_not}")
        return False
    return setting == "on" or (AUTO_ON_CUDA and step.sae.W_enc.device.type == "cuda")


class CompiledStep:
    """`step.run(x, compute_fvu=False, aux_width)` compiled whole (see the module docstring)."""

    def __init__(self, step: SparseTopKStep) -> None:
        why_not = _why_not_compiled(step)
        if why_not is not None:
            raise ValueError(f"a compiled step {why_not}")
        self.step = step
        self.device = step.sae.W_enc.device
        mode = "reduce-overhead" if self.device.type == "cuda" else None  # CUDA graphs on a GPU
        self._fn = torch.compile(self._body, fullgraph=True, dynamic=False, mode=mode)
        self.calls = 0

    def _body(self, x: Tensor, aux_width: int) -> tuple[Tensor, ...]:
        stats = self.step.run(x, False, aux_width)
        return tuple(getattr(stats, name) for name in _FIELDS)

    def _mark_static(self, x: Tensor) -> None:
        """Buffers the graph mutates keep their addresses (CUDA graphs copy other inputs, and
        skip a graph that writes an input not marked): allocated here, before the first trace,
        and marked whole (a slice would carry the mark, not its buffer)."""
        step = self.step
        rows = step.chunk_rows(x.shape[0])
        with torch.no_grad():
            step.pre_buffer(rows)
            step.refresh_low_precision_()
            if step.precision.low:
                step.encode_chunk(x[:rows] - step.sae.b_pre)  # allocates the chunk's [x | 1] buffer
        tensors = [p.grad for p in step.sae.parameters()] + [step.tracker.tokens_since_fired]
        tensors += [t for t in (step._pre, step._w_enc_low, step._x_low) if t is not None]
        for t in tensors:
            torch._dynamo.mark_static_address(t)

    def __call__(self, x: Tensor, aux_width: int) -> StepStats:
        if self.calls == 0:
            self._mark_static(x)
        self.calls += 1
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs may be overwritten
        values = self._fn(x, aux_width)
        stats = StepStats(**dict(zip(_FIELDS, values)))
        self.step.finish(stats)
        return stats
