"""The peers' own training steps, for `saescale bench step --peers ...` (timed in a child
process of their own by `step_worker`, on the same batch, sizes and device as saescale's step).

sparsify (EleutherAI, `eai-sparsify`, the `interop` extra): one step of `sparsify.Trainer` on an
autoencoder with its defaults, written out from its loop: `set_decoder_norm_to_unit_norm()`,
the forward of its `SparseCoder` (its fused encoder: linear + top-k with its own backward; its
decoder: `decoder_impl`, a Triton kernel on CUDA, `embedding_bag` on CPU; bf16 autocast where
CUDA supports bf16, as its `forward` is decorated, fp32 elsewhere), the FVU loss (plus AuxK at
1/32 on the planted dead latents when the bench's AuxK is on; sparsify's default is off),
`backward`, `remove_gradient_parallel_to_decoder_directions()`, its default optimiser (SignSGD
in a ScheduleFree wrapper, momentum 0.95, lr 5e-3/sqrt(N/2^14)) `step` and `zero_grad`, and its
dead-latent counter update. Its weights start as a copy of saescale's (the planted dead latents
included), so both top-ks see the same pre-activations.

saelens (SAELens v6, `sae-lens`, the `interop` extra): one step of its `SAETrainer._train_step`
on a `TopKTrainingSAE` with its defaults (dense feature activations, activations rescaled by the
decoder norm, AuxK coefficient 1 on the planted dead latents when the bench's AuxK is on, no
autocast: its default), written out from that method: `training_forward_pass` (encode, top-k,
decode, MSE plus AuxK), its firing counters (`feature_acts.bool()` summed over the batch),
`backward`, `clip_grad_norm_(…, 1.0)`, Adam (its defaults: lr 3e-4, betas 0.9/0.999) `step` and
`zero_grad`. Weights copied from saescale's as for sparsify.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import torch

from saescale.core.model import TopKSAE

PEERS = ("sparsify", "saelens")


def sparsify_step(sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor, auxk: bool) -> Callable[[], None]:
    """One of sparsify's training steps on `x` (see the module), as a closure."""
    if x.device.type == "cpu":
        # sparsify takes its Triton decoder whenever triton imports, CUDA or not (installed here
        # by the `kernels` extra); on a CPU that decoder cannot run: its eager one, as before
        os.environ["SPARSIFY_DISABLE_TRITON"] = "1"
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    cfg = sae.cfg
    device = x.device
    coder = SparseCoder(
        cfg.d_in,
        SparseCoderConfig(num_latents=cfg.n_latents, k=cfg.k, multi_topk=cfg.multi_topk),
        device=device,
        dtype=torch.float32,
    )
    with torch.no_grad():
        coder.encoder.weight.copy_(sae.W_enc)
        coder.encoder.bias.copy_(sae.b_enc)
        coder.W_dec.copy_(sae.W_dec)
        coder.b_dec.copy_(sae.b_pre)
    lr = 5e-3 / math.sqrt(cfg.n_latents / 2**14)
    optimizer = ScheduleFreeWrapper(SignSGD([{"params": coder.parameters(), "lr": lr}]), momentum=0.95)
    optimizer.train()
    auxk_alpha = 1 / 32 if auxk and len(dead) else 0.0
    since_fired = torch.zeros(cfg.n_latents, dtype=torch.long, device=device)
    threshold = 10_000_000

    def step() -> None:
        since_fired[dead] = threshold + 1  # the planted dead latents stay dead, as in saescale's step
        coder.set_decoder_norm_to_unit_norm()
        dead_mask = since_fired > threshold if auxk_alpha > 0 else None
        out = coder(x=x, y=x, dead_mask=dead_mask)
        loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            fired = torch.zeros(cfg.n_latents, dtype=torch.bool, device=device)
            fired[out.latent_indices.flatten()] = True
            since_fired.add_(x.shape[0])
            since_fired[fired] = 0

    return step


def saelens_step(sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor, auxk: bool) -> Callable[[], None]:
    """One of SAELens' training steps on `x` (see the module), as a closure."""
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    cfg = sae.cfg
    device = x.device
    theirs = TopKTrainingSAE(
        TopKTrainingSAEConfig(d_in=cfg.d_in, d_sae=cfg.n_latents, k=cfg.k, dtype="float32", device=str(device))
    )
    with torch.no_grad():
        theirs.W_enc.copy_(sae.W_enc.t())
        theirs.b_enc.copy_(sae.b_enc)
        theirs.W_dec.copy_(sae.W_dec)
        theirs.b_dec.copy_(sae.b_pre)
    params = list(theirs.parameters())
    optimizer = torch.optim.Adam(params, lr=3e-4, betas=(0.9, 0.999))
    dead_mask = torch.zeros(cfg.n_latents, dtype=torch.bool, device=device)
    if auxk:
        dead_mask[dead] = True  # the planted dead latents, as saescale's step sees them
    since_fired = torch.zeros(cfg.n_latents, device=device)
    act_freq = torch.zeros(cfg.n_latents, device=device)

    def step() -> None:
        theirs.train()
        out = theirs.training_forward_pass(
            TrainStepInput(
                sae_in=x,
                coefficients=theirs.get_coefficients(),
                dead_neuron_mask=dead_mask,
                n_training_steps=0,
                is_logging_step=False,
            )
        )
        with torch.no_grad():
            firing = out.feature_acts.bool().float()
            since_fired.add_(1)
            since_fired[firing.sum(-2).bool()] = 0
            act_freq.add_(firing.sum(0))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()

    return step


def peer_step(name: str, sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor, spec: dict[str, Any]) -> Callable[[], None]:
    if name == "sparsify":
        return sparsify_step(sae, x, dead, bool(spec["auxk"]))
    if name == "saelens":
        return saelens_step(sae, x, dead, bool(spec["auxk"]))
    raise ValueError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
