"""The evaluation job (`python jobs/eval.py`): a trained SAE on held-out activations and
through the language model.

Writes `results.json` (schema in the README: reconstruction metrics, downstream loss, probes,
N2G explanations, ablation sparsity, the evaluation's settings) and `latent_density.png` to
output_dir, and logs the scalars to wandb. The held-out rows are the cache's first
`data.holdout_shards` shards, which training never reads.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from saescale import storage
from saescale.app.errors import USER_ERRORS, fail
from saescale.app.job_paths import check_job_paths
from saescale.app.schema import EvalJobConfig
from saescale.console import print0
from saescale.data.reader import ActivationCache
from saescale.evaluation.downstream import downstream_loss
from saescale.evaluation.reconstruction import reconstruction_metrics
from saescale.formats.saved import load_sae

SCHEMA = "saescale.eval.v1"


def heldout_windows(cache: ActivationCache, shards: list[int], count: int) -> tuple[torch.Tensor, list[int]]:
    """Token ids [count, context] of windows whose rows lie in the held-out shards."""
    ids: list[int] = []
    for s in shards:
        ids.extend(sorted(set(cache.read_table(s).column("window").to_pylist())))
    chosen = sorted(set(ids))[:count]
    table = cache.windows()
    by_window = dict(zip(table.column("window").to_pylist(), table.column("token_ids").to_pylist()))
    return torch.tensor([by_window[w] for w in chosen], dtype=torch.long), chosen


def run_probes(
    cfg: EvalJobConfig, cache: ActivationCache, sae, acts: torch.Tensor, shards: list[int], tokenizer
) -> dict:
    """Best 1-D probe per task over the latents' pre-activations on held-out rows."""
    from saescale.evaluation.probes import probe_losses
    from saescale.evaluation.tasks import label_builtin_tasks, load_task_file

    rows = min(cfg.probes.tokens, acts.shape[0])
    tables = [cache.read_table(s).select(["window", "pos"]) for s in shards]
    positions = [
        (int(w), int(p)) for t in tables for w, p in zip(t.column("window").to_pylist(), t.column("pos").to_pylist())
    ][:rows]
    window_tokens = cache.windows()
    by_window = dict(zip(window_tokens.column("window").to_pylist(), window_tokens.column("token_ids").to_pylist()))
    needed = sorted({w for w, _ in positions})
    vocab_text = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    texts = [[vocab_text[t] for t in by_window[w]] for w in needed]
    local = {w: i for i, w in enumerate(needed)}
    tasks = label_builtin_tasks(texts, [(local[w], p) for w, p in positions])
    for path in cfg.probes.task_files:
        tasks.update(load_task_file(path, positions))
    with torch.no_grad():
        features = sae.pre_activations(sae.normalize(acts[:rows].float())[0])
    results = [r.to_dict() for r in probe_losses(features, tasks)]
    return {
        "tokens": rows,
        "tasks": results,
        "mean_probe_loss": float(np.mean([r["probe_loss"] for r in results])) if results else float("nan"),
        "mean_prior_loss": float(np.mean([r["prior_loss"] for r in results])) if results else float("nan"),
    }


def padding_token(tokenizer, text: str) -> int:
    """The single token of `text` (the neutral filler of N2G), or the end-of-sequence token."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else tokenizer.eos_token_id


def run_explanations(cfg: EvalJobConfig, cache: ActivationCache, sae, shards: list[int], lm, manifest) -> dict:
    """N2G explanations explained on the first half of the held-out windows, scored on the second."""
    from saescale.evaluation.explain import explain_latents

    windows, _ = heldout_windows(cache, shards, cfg.explain.windows)
    vocab = lm.tokenizer.convert_ids_to_tokens
    return explain_latents(
        lm.model,
        sae,
        windows,
        manifest.hook,
        manifest.layer,
        padding_token(lm.tokenizer, cfg.explain.padding_text),
        n_latents=cfg.explain.latents,
        examples=cfg.explain.examples,
        max_context=cfg.explain.max_context,
        seed=cfg.explain.seed,
        decode=lambda t: vocab(t),
    )


def run_ablation(cfg: EvalJobConfig, cache: ActivationCache, sae, shards: list[int], lm, manifest) -> dict:
    """Ablation sparsity at seeded held-out positions (each with a full horizon after it)."""
    from saescale.evaluation.ablation import ablation_sparsity

    windows, _ = heldout_windows(cache, shards, cfg.ablation.positions)
    horizon = cfg.ablation.horizon
    if windows.shape[1] <= horizon:
        raise ValueError(f"ablation.horizon={horizon} needs windows longer than {windows.shape[1]} tokens")
    generator = torch.Generator().manual_seed(cfg.ablation.seed)
    starts = torch.randint(1, windows.shape[1] - horizon + 1, (windows.shape[0],), generator=generator).tolist()
    return ablation_sparsity(
        lm.model, sae, windows, manifest.hook, manifest.layer, list(enumerate(starts)), horizon
    ).to_dict()


def plot_density(density_log10: list[float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.asarray(density_log10)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(values[values > -10], bins=50)
    ax.set(
        xlabel="log10 latent density (fraction of tokens)",
        ylabel="latents",
        title=f"{int((values <= -10).sum())} latents never fired",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # path may be a temp name without the extension
    plt.close(fig)


def run_eval(raw: DictConfig) -> dict:
    """The whole job; bad input exits 2 with one line (see `app.errors`)."""
    try:  # under `ray job submit --working-dir`, relative paths point into Ray's temporary copy
        cfg: EvalJobConfig = OmegaConf.to_object(raw)  # type: ignore[assignment]
        options = storage.endpoint_options(cfg.data.endpoint_url)
        check_job_paths(reads={"sae": cfg.sae, "data.cache": cfg.data.cache}, writes={"output_dir": cfg.output_dir})
        sae, meta = load_sae(cfg.sae, storage_options=options)
        cache = ActivationCache(cfg.data.cache, options)
    except USER_ERRORS as exc:
        fail(exc)
    manifest = cache.manifest
    if manifest.d_model != sae.cfg.d_in:
        fail(f"the SAE has d_in={sae.cfg.d_in} but the cache has d_model={manifest.d_model}")
    shards = list(range(cfg.data.holdout_shards))
    try:
        acts = torch.cat([cache.read_shard(s) for s in shards])[: cfg.data.heldout_tokens]
    except USER_ERRORS as exc:  # a damaged held-out shard or unreachable storage
        fail(exc)
    recon = reconstruction_metrics(sae, acts)
    print0(
        f"reconstruction on {recon.tokens} held-out tokens: NMSE {recon.nmse:.4f}, L0 {recon.l0:.1f}, "
        f"dead {recon.dead_fraction:.3%}"
    )
    result: dict = {
        "schema": SCHEMA,
        "sae": storage.redact(cfg.sae),
        "cache": storage.redact(cfg.data.cache),
        "model": manifest.model,
        "hook": f"{manifest.hook}.{manifest.layer}",
        "n_latents": sae.cfg.n_latents,
        "k": sae.cfg.k,
        "reconstruction": recon.to_dict(),
    }
    lm = None
    if cfg.downstream.enabled or cfg.probes.enabled or cfg.explain.enabled or cfg.ablation.enabled:
        from saescale.lm.models import load_causal_lm

        lm = load_causal_lm(cfg.downstream.model or manifest.model)
    if cfg.probes.enabled:
        result["probes"] = run_probes(cfg, cache, sae, acts, shards, lm.tokenizer)
        losses = [r["probe_loss"] for r in result["probes"]["tasks"]]
        print0(
            f"probe loss over {len(losses)} tasks: {result['probes']['mean_probe_loss']:.4f} "
            f"(base-rate prior {result['probes']['mean_prior_loss']:.4f})"
        )
    if cfg.downstream.enabled:
        windows, _ = heldout_windows(cache, shards, cfg.downstream.windows)
        special = torch.tensor(sorted(lm.tokenizer.all_special_ids), dtype=torch.long)
        keep = ~torch.isin(windows, special)  # the cache dropped these positions: keep them clean
        down = downstream_loss(
            lm.model, sae, windows, manifest.hook, manifest.layer, keep, batch_size=cfg.downstream.batch_size
        )
        print0(
            f"downstream on {down.tokens} tokens: CE {down.ce_clean:.4f} -> {down.ce_spliced:.4f} "
            f"(+{down.ce_increase:.4f}; zero-ablation {down.ce_zero_ablation:.4f}), KL {down.kl_clean_to_spliced:.4f}"
        )
        result["downstream"] = down.to_dict()
    if cfg.explain.enabled:
        result["explanations"] = run_explanations(cfg, cache, sae, shards, lm, manifest)
        e = result["explanations"]
        print0(
            f"N2G explanations of {len(e['latents'])} latents: precision {e['mean_precision']:.3f}, "
            f"recall {e['mean_recall']:.3f}, F1 {e['mean_f1']:.3f}"
        )
    if cfg.ablation.enabled:
        result["ablation_sparsity"] = run_ablation(cfg, cache, sae, shards, lm, manifest)
        a = result["ablation_sparsity"]
        print0(
            f"ablation sparsity over {a['pairs']} (position, latent) pairs: {a['mean']:.4g} "
            f"(1/(V*T) = {1 / (len(lm.tokenizer) * a['horizon']):.3g})"
        )
    out = cfg.output_dir
    out_options = options if storage.is_remote(out) else None
    storage.write_json_atomic(storage.join(out, "results.json"), result, out_options)
    storage.write_file_atomic(
        storage.join(out, "latent_density.png"), lambda p: plot_density(recon.density_log10, p), out_options
    )
    if cfg.wandb.enabled and cfg.wandb.mode != "disabled":
        from saescale.train.loggers import WandbLogger

        scalars = {f"eval/{k}": v for k, v in recon.to_dict().items() if k != "density_log10"}
        scalars.update({f"eval/{k}": v for k, v in result.get("downstream", {}).items()})
        if "probes" in result:
            scalars["eval/mean_probe_loss"] = result["probes"]["mean_probe_loss"]
        if "explanations" in result:
            scalars.update(
                {f"eval/n2g_{k}": result["explanations"][f"mean_{k}"] for k in ("precision", "recall", "f1")}
            )
        if "ablation_sparsity" in result:
            scalars["eval/ablation_sparsity"] = result["ablation_sparsity"]["mean"]
        logger = WandbLogger(
            cfg.wandb.project,
            f"eval-{cfg.run_name}",
            cfg.wandb.group,
            ["eval"],
            OmegaConf.to_container(raw, resolve=True) | {"sae": storage.redact(cfg.sae)},
            cfg.wandb.mode,
            storage.local_path(out),
        )
        logger.log(scalars, 0)
        logger.log_histogram("eval/latent_density_log10", torch.tensor(recon.density_log10), 0)
        logger.close()
    summary = {k: v for k, v in result["reconstruction"].items() if k != "density_log10"}
    probes = {k: v for k, v in result.get("probes", {}).items() if k != "tasks"}
    explained = {k: v for k, v in result.get("explanations", {}).items() if k.startswith("mean_")}
    print0(
        json.dumps(
            {
                "reconstruction": summary,
                "downstream": result.get("downstream"),
                "probes": probes,
                "explanations": explained,
                "ablation_sparsity": result.get("ablation_sparsity"),
            }
        )
    )
    return result
