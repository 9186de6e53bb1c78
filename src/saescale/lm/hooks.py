"""Hook sites of a decoder-only transformer and a forward that stops after the hooked layer.

Sites (Hugging Face Llama/Mistral/Qwen/GPT-NeoX-style `model.model.layers`):
  resid_post  residual stream after block L (the paper's site)
  mlp_out     output of block L's MLP
  attn_out    output of block L's attention
"""

from __future__ import annotations

import contextlib
from contextlib import contextmanager

import torch
from torch import nn

HOOK_SITES = ("resid_post", "mlp_out", "attn_out")


class HookError(ValueError):
    """Unknown hook site or a layer out of range."""


def first_module(model: nn.Module, paths: tuple[str, ...], kind: type = nn.Module) -> nn.Module | None:
    """The first of the dotted attribute `paths` that exists on `model` and is a `kind` (the same
    part sits at different names in different model families)."""
    for path in paths:
        obj: object = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, kind):
            return obj
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = first_module(model, ("model.layers", "transformer.h", "gpt_neox.layers"), nn.ModuleList)
    if layers is not None:
        return layers  # type: ignore[return-value]
    raise HookError(f"cannot find the decoder layers of {type(model).__name__}")


def hook_module(model: nn.Module, site: str, layer: int) -> nn.Module:
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise HookError(f"layer {layer} is out of range: the model has layers 0..{len(layers) - 1}")
    block = layers[layer]
    if site == "resid_post":
        return block
    if site == "mlp_out":
        return block.mlp
    if site == "attn_out":
        return getattr(block, "self_attn", None) or block.attn
    raise HookError(f"unknown hook site {site!r}; choose one of {HOOK_SITES}")


class _StopForward(Exception):
    pass


@contextmanager
def capture(model: nn.Module, site: str, layer: int):
    """Yields a dict whose "acts" holds the hooked output after a forward; the forward stops
    right after the hooked module, so later layers never run."""
    store: dict[str, torch.Tensor] = {}
    module = hook_module(model, site, layer)

    def hook(_mod, _inp, out):
        store["acts"] = (out[0] if isinstance(out, tuple) else out).detach()
        raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def run_to_hook(model: nn.Module, input_ids: torch.Tensor, site: str, layer: int) -> torch.Tensor:
    """Activations [batch, seq, d_model] at the hook site; runs only the layers it needs."""
    # _StopForward is raised at the hook: the later layers never run
    with capture(model, site, layer) as store, torch.no_grad(), contextlib.suppress(_StopForward):
        model(input_ids=input_ids, use_cache=False)
    if "acts" not in store:
        raise HookError(f"hook {site}.{layer} did not fire")
    return store["acts"]
