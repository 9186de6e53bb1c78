"""Train a TopK sparse autoencoder on a language model's activations.

    python jobs/train.py                       # embedded default (make train)
    python jobs/train.py sae.n_latents=8192 sae.k=64 data.cache=s3://bucket/cache/run1

Steps: open the activation cache (built by jobs/cache.py), hold out its last shard(s), stream the
others in shuffled shard order into the trainer with checkpoints (a rerun with the same run_name
resumes at the same batch), evaluate NMSE on held-out tokens, save the SAE and its SAELens and
sparsify exports, log to wandb.
"""

from __future__ import annotations

import json
import os

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from saescale import storage
from saescale.config import SAEConfig, TrainConfig
from saescale.export import export_saelens, export_sparsify
from saescale.cache.reader import ActivationCache
from saescale.loggers import ConsoleLogger, JsonlLogger, MultiLogger, WandbLogger
from saescale.model import TopKSAE
from saescale.saved import save_sae
from saescale.trainer import Trainer


def print0(*args) -> None:
    print("[saescale]", *args, flush=True)


@hydra.main(config_path="../conf", config_name="train", version_base=None)
def main(cfg: DictConfig) -> dict:
    torch.set_num_threads(cfg.train.threads)
    out = cfg.output_dir
    os.makedirs(out, exist_ok=True)

    # ---- data: the activation cache ---------------------------------------------------------
    options = {"client_kwargs": {"endpoint_url": cfg.data.endpoint_url}} if cfg.data.endpoint_url else None
    cache = ActivationCache(cfg.data.cache, options)
    manifest = cache.manifest
    n_shards = len(manifest.shards)
    if n_shards <= cfg.data.holdout_shards:
        raise SystemExit(f"the cache has {n_shards} shard(s); need more than data.holdout_shards={cfg.data.holdout_shards}")
    # every shard is a uniform sample of the cache; the first ones (always full) are held out
    holdout = list(range(cfg.data.holdout_shards))
    train_shards = list(range(cfg.data.holdout_shards, n_shards))
    heldout = torch.cat([cache.read_shard(s) for s in holdout])[: cfg.data.heldout_tokens]
    sae_cfg = SAEConfig(d_in=manifest.d_model, **OmegaConf.to_container(cfg.sae))
    print0(f"cache {cfg.data.cache}: {manifest.n_rows} rows of {manifest.model} {manifest.hook}.{manifest.layer}, "
           f"training on {len(train_shards)} shards, {heldout.shape[0]} held-out rows")

    # ---- model and trainer ---------------------------------------------------------------
    steps_per_epoch = cache.batches_per_epoch(cfg.train.batch_size, train_shards)
    total_steps = steps_per_epoch * cfg.train.epochs
    train_keys = ("lr", "warmup_steps", "decay_start_frac", "clip_grad_norm", "ema_decay", "seed", "log_every",
                  "histogram_every", "checkpoint_every")
    train_cfg = TrainConfig(total_steps=total_steps, **{k: cfg.train[k] for k in train_keys})
    run_config = OmegaConf.to_container(cfg, resolve=True)
    loggers = [ConsoleLogger(total_steps), JsonlLogger(os.path.join(out, "metrics.jsonl"))]
    if cfg.wandb.enabled and cfg.wandb.mode != "disabled":
        tags = list(cfg.wandb.tags) + [f"N={sae_cfg.n_latents}", f"k={sae_cfg.k}", f"model={manifest.model}",
                                        f"hook={manifest.hook}.{manifest.layer}"]
        loggers.append(WandbLogger(cfg.wandb.project, cfg.run_name, cfg.wandb.group, tags, run_config,
                                   cfg.wandb.mode, out))  # wandb adds its own wandb/ folder
    logger = MultiLogger(*loggers)
    trainer = Trainer(TopKSAE(sae_cfg), train_cfg, logger, checkpoint_url=os.path.join(out, "checkpoints"))
    start = trainer.restore()
    if start:
        print0(f"resuming {cfg.run_name} from step {start}")
    else:
        trainer.initialize(cache.read_shard(train_shards[0])[: train_cfg.geometric_median_samples])
    batches = cache.iter_batches(cfg.train.batch_size, train_shards, cfg.train.epochs, cfg.train.seed, start_batch=start)
    summary = trainer.fit(batches)
    trainer.save_checkpoint()

    # ---- evaluation, save, export ----------------------------------------------------------
    sae = trainer.sae
    if trainer.ema is not None:
        from saescale.saved import load_sae_tensors

        load_sae_tensors(sae, {**trainer.eval_weights(), "input_scale": sae.input_scale})
    with torch.no_grad():
        recon = sae(heldout)
    nmse = (((recon - heldout) ** 2).mean() / ((heldout - heldout.mean(0)) ** 2).mean()).item()
    result_url = os.path.join(out, "result.json")
    previous = storage.read_json(result_url) if os.path.exists(result_url) else {}
    result = {
        "run_name": cfg.run_name, "steps": summary.steps, "tokens": summary.tokens,
        "heldout_nmse": nmse, "dead_fraction": trainer.tracker.dead_fraction(),
        # a rerun of a finished run trains no step: keep the last training metrics it had
        "train_fvu": summary.final.get("fvu", previous.get("train_fvu")),
        "n_latents": sae_cfg.n_latents, "k": sae_cfg.k,
    }
    logger.log({"heldout_nmse": nmse}, trainer.step)
    meta = {"model_name": manifest.model, "hook_name": f"{manifest.hook}.{manifest.layer}",
            "context_size": manifest.context_length, "corpus": manifest.corpus, "cache": cfg.data.cache}
    save_sae(sae, os.path.join(out, "sae"), metadata=meta)
    if cfg.export.saelens:
        export_saelens(sae, os.path.join(out, "export", "saelens"), meta)
    if cfg.export.sparsify:
        export_sparsify(sae, os.path.join(out, "export", "sparsify"))
    storage.write_json_atomic(result_url, result)
    logger.close()
    print0(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
