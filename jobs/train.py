"""Train a TopK sparse autoencoder on a language model's activations.

    python jobs/train.py                       # embedded default (make train)
    python jobs/train.py sae.n_latents=8192 sae.k=64 data.layer=12

Steps: collect activations at the hook site (the shortest honest path until the streaming cache
lands), split off a held-out set, train with checkpoints (a rerun with the same run_name resumes),
evaluate NMSE on held-out tokens, save the SAE and its SAELens/sparsify exports, log to wandb.
"""

from __future__ import annotations

import itertools
import json
import os
import random

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from saescale import storage
from saescale.config import SAEConfig, TrainConfig
from saescale.export import export_saelens, export_sparsify
from saescale.lm.activations import collect_activations
from saescale.lm.corpus import iter_documents
from saescale.lm.models import load_causal_lm
from saescale.loggers import ConsoleLogger, JsonlLogger, MultiLogger, WandbLogger
from saescale.model import TopKSAE
from saescale.saved import save_sae
from saescale.trainer import Trainer


def print0(*args) -> None:
    print("[saescale]", *args, flush=True)


def shuffled_batches(acts: torch.Tensor, batch_size: int, epochs: int, seed: int):
    """Epochs of shuffled fixed-size batches; deterministic, so a resumed run can skip ahead."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(acts.shape[0], generator=g)
        for start in range(0, acts.shape[0] - batch_size + 1, batch_size):
            yield acts[order[start : start + batch_size]]


@hydra.main(config_path="../conf", config_name="train", version_base=None)
def main(cfg: DictConfig) -> dict:
    torch.set_num_threads(cfg.train.threads)
    random.seed(cfg.train.seed)
    out = cfg.output_dir
    os.makedirs(out, exist_ok=True)

    # ---- data: activations from the language model -------------------------------------
    lm = load_causal_lm(cfg.data.model)
    d_model = lm.model.config.hidden_size
    sae_cfg = SAEConfig(d_in=d_model, **OmegaConf.to_container(cfg.sae))  # validate before the slow part
    total = cfg.data.train_tokens + cfg.data.heldout_tokens
    acts = collect_activations(
        lm.model, lm.tokenizer, iter_documents(cfg.data.corpus, cfg.data.text_field),
        cfg.data.hook, cfg.data.layer, cfg.data.context_length, total, cfg.data.lm_batch_windows,
    )
    del lm
    perm = torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(cfg.train.seed))
    heldout, train = acts[perm[: cfg.data.heldout_tokens]], acts[perm[cfg.data.heldout_tokens :]]
    print0(f"{train.shape[0]} training and {heldout.shape[0]} held-out activations, d_model={acts.shape[1]}")

    # ---- model and trainer ---------------------------------------------------------------
    steps_per_epoch = train.shape[0] // cfg.train.batch_size
    total_steps = steps_per_epoch * cfg.train.epochs
    train_keys = ("lr", "warmup_steps", "decay_start_frac", "clip_grad_norm", "ema_decay", "seed", "log_every",
                  "histogram_every", "checkpoint_every")
    train_cfg = TrainConfig(total_steps=total_steps, **{k: cfg.train[k] for k in train_keys})
    run_config = OmegaConf.to_container(cfg, resolve=True)
    loggers = [ConsoleLogger(total_steps), JsonlLogger(os.path.join(out, "metrics.jsonl"))]
    if cfg.wandb.enabled and cfg.wandb.mode != "disabled":
        tags = list(cfg.wandb.tags) + [f"N={sae_cfg.n_latents}", f"k={sae_cfg.k}", f"hook={cfg.data.hook}.{cfg.data.layer}"]
        loggers.append(WandbLogger(cfg.wandb.project, cfg.run_name, cfg.wandb.group, tags, run_config,
                                   cfg.wandb.mode, os.path.join(out, "wandb")))
    logger = MultiLogger(*loggers)
    trainer = Trainer(TopKSAE(sae_cfg), train_cfg, logger, checkpoint_url=os.path.join(out, "checkpoints"))
    start = trainer.restore()
    if start:
        print0(f"resuming {cfg.run_name} from step {start}")
    else:
        trainer.initialize(train[: train_cfg.geometric_median_samples])
    batches = shuffled_batches(train, cfg.train.batch_size, cfg.train.epochs, cfg.train.seed)
    summary = trainer.fit(itertools.islice(batches, start, None))
    trainer.save_checkpoint()

    # ---- evaluation, save, export ----------------------------------------------------------
    sae = trainer.sae
    if trainer.ema is not None:
        from saescale.saved import load_sae_tensors

        load_sae_tensors(sae, {**trainer.eval_weights(), "input_scale": sae.input_scale})
    with torch.no_grad():
        recon = sae(heldout)
    nmse = (((recon - heldout) ** 2).mean() / ((heldout - heldout.mean(0)) ** 2).mean()).item()
    result = {
        "run_name": cfg.run_name, "steps": summary.steps, "tokens": summary.tokens,
        "heldout_nmse": nmse, "dead_fraction": trainer.tracker.dead_fraction(),
        "train_fvu": summary.final.get("fvu"), "n_latents": sae_cfg.n_latents, "k": sae_cfg.k,
    }
    logger.log({"heldout_nmse": nmse}, trainer.step)
    meta = {"model_name": cfg.data.model, "hook_name": f"{cfg.data.hook}.{cfg.data.layer}",
            "context_size": cfg.data.context_length, "corpus": cfg.data.corpus}
    save_sae(sae, os.path.join(out, "sae"), metadata=meta)
    if cfg.export.saelens:
        export_saelens(sae, os.path.join(out, "export", "saelens"), meta)
    if cfg.export.sparsify:
        export_sparsify(sae, os.path.join(out, "export", "sparsify"))
    storage.write_json_atomic(os.path.join(out, "result.json"), result)
    logger.close()
    print0(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
