"""Activation functions of the autoencoder, one module each, looked up by `sae.architecture`.

Adding one: a module with an `Activation` subclass (see `base`), listed here and in
`saescale.core.config.ARCHITECTURES`; the model, the training step and the dense reference
dispatch through this registry.
"""

from __future__ import annotations

from saescale.core.arch import batchtopk, relu, topk
from saescale.core.arch.base import Activation, TopKCode
from saescale.core.config import ARCHITECTURES

REGISTRY: dict[str, Activation] = {m.ACTIVATION.name: m.ACTIVATION for m in (topk, batchtopk, relu)}
assert tuple(REGISTRY) == ARCHITECTURES, "saescale.core.config.ARCHITECTURES lists the registry's names"


def activation(name: str) -> Activation:
    """The activation registered as `name` (SAEConfig has already checked it is one)."""
    return REGISTRY[name]


__all__ = ["REGISTRY", "Activation", "TopKCode", "activation"]
