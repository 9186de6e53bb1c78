"""The feature job (`python jobs/features.py`): what every latent of a trained or imported SAE
learned, as per-feature JSON, a Neuronpedia export and a static viewer.

Two streamed passes over the cache (`features.contexts`), run in this process or on Ray Data
(`service.feature_pass`) with the same per-block code: the statistics and examples of the chosen
latents over the held-out shards (or all), then each example's whole window. Then, from the
weights and the language model: logit effects, decoder neighbours and N2G explanations with
held-out precision and recall (the evaluation's code). Everything is written to a local staging
folder and published in one step: a failed run leaves the previous pages as they were.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from saescale import storage
from saescale.app.errors import USER_ERRORS, fail
from saescale.app.job_paths import check_job_paths
from saescale.app.schema import DEFAULT_CACHE, FeaturesJobConfig
from saescale.console import print0
from saescale.core.config import ConfigError
from saescale.data.reader import ActivationCache
from saescale.features.contexts import (
    ContextWork,
    SketchWork,
    WindowActivations,
    gather_contexts,
    merge_sketches,
    pair_keys,
)
from saescale.features.passes import InMemorySAE, LocalRunner
from saescale.features.sketch import HIST_EDGES, LatentSketch
from saescale.formats.saved import load_sae


class Phases:
    """Wall time of each phase, printed as it ends and kept for the result (what to speed up)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.mark = time.time()

    def done(self, name: str) -> None:
        now = time.time()
        self.seconds[name] = round(now - self.mark, 2)
        self.mark = now


OVERSAMPLE = 4  # the random sample keeps this many times the examples shown (the bins are its quantiles)


def choose_latents(spec, n_latents: int, seed: int) -> np.ndarray:
    """features.latents: "all", a count (a seeded sample), or a list of ids -> sorted ids."""
    if isinstance(spec, str) and spec == "all":
        return np.arange(n_latents, dtype=np.int64)
    if isinstance(spec, str) and spec.strip().lstrip("-").isdigit():  # features.latents='100'
        spec = int(spec)
    if isinstance(spec, str):
        raise ConfigError(f"features.latents={spec!r}: expected all, a count, or a list of latent ids")
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec <= 0:
            raise ConfigError(f"features.latents={spec}: choose a count > 0, a list of latents, or all")
        chosen = np.random.default_rng(seed).permutation(n_latents)[: min(spec, n_latents)]
        return np.sort(chosen).astype(np.int64)
    try:
        ids = sorted({int(x) for x in spec})
    except (TypeError, ValueError):
        raise ConfigError(f"features.latents={spec!r}: expected all, a count, or a list of latent ids") from None
    if not ids:
        raise ConfigError("features.latents is an empty list: name at least one latent, a count, or all")
    bad = [i for i in ids if not 0 <= i < n_latents]
    if bad:
        raise ConfigError(f"features.latents {bad[:5]} out of range: the SAE has latents 0..{n_latents - 1}")
    return np.asarray(ids, dtype=np.int64)


def check_cache_matches(meta: dict, manifest, d_in: int, cache_url: str) -> None:
    """The SAE must read the activations it was trained on: same width, and (when its metadata
    says) the same model and hook."""
    where = storage.redact(cache_url)
    if manifest.d_model != d_in:
        raise ConfigError(f"the SAE has d_in={d_in} but the cache {where} has d_model={manifest.d_model}")
    hook = f"{manifest.hook}.{manifest.layer}"
    if meta.get("model_name") and meta["model_name"] != manifest.model:
        raise ConfigError(f"the SAE was trained on {meta['model_name']} but the cache {where} holds {manifest.model}")
    if meta.get("hook_name") and meta["hook_name"] != hook:
        raise ConfigError(f"the SAE was trained on hook {meta['hook_name']} but the cache {where} holds {hook}")


def check_output_dir(url: str, options) -> None:
    """The pages replace output_dir whole: refuse a folder that is not feature pages (a run
    folder, say), so a wrong output_dir never deletes an SAE."""
    from saescale.features.pages import INDEX_SCHEMA

    fs, path = storage.url_to_fs(url, options)
    try:
        entries = fs.ls(path, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return
    if not entries:
        return
    index = storage.join(url, "index.json")
    if storage.exists(index, options):
        try:
            if storage.read_json(index, options).get("schema") == INDEX_SCHEMA:
                return
        except ValueError:
            pass
    raise ConfigError(
        f"output_dir {storage.redact(url)} holds something other than feature pages, which would be "
        "replaced: choose an empty or new folder (the default is <run>/features)"
    )


def check_model(lm, site: str, layer: int) -> None:
    """What the later phases need of the model, checked before the passes: the hook site, an
    unembedding for the logit effects."""
    from saescale.lm.hooks import hook_module

    hook_module(lm.model, site, layer)
    if getattr(lm.model.get_output_embeddings(), "weight", None) is None:
        raise ConfigError(f"{type(lm.model).__name__} has no output embedding to read logit effects from")


def windows_of_length(table, length: int) -> list[int]:
    """Ids of the windows with exactly `length` tokens (Arrow compute: no Python list per window)."""
    import pyarrow.compute as pc

    full = pc.equal(pc.list_value_length(table.column("token_ids")), length)
    return table.column("window").filter(full).to_pylist()


def window_tokens(table, wanted: set[int]) -> dict[int, list[int]]:
    """window -> token ids, for the `wanted` windows only."""
    import pyarrow as pa
    import pyarrow.compute as pc

    chosen = table.filter(pc.is_in(table.column("window"), value_set=pa.array(sorted(wanted), pa.int32())))
    return dict(zip(chosen.column("window").to_pylist(), chosen.column("token_ids").to_pylist()))


def token_strings(tokenizer, ids) -> dict[int, str]:
    unique = sorted({int(i) for i in ids})
    return dict(zip(unique, tokenizer.batch_decode([[i] for i in unique])))


def make_runner(cfg: FeaturesJobConfig, cache: ActivationCache, cache_url: str, sae, options):
    """(runner, SAE source): Ray Data with the SAE loaded in each actor, or this process."""
    use_ray = cfg.runner.ray
    if use_ray is None:
        use_ray = bool(cfg.runner.address or os.environ.get("RAY_ADDRESS"))
    if not use_ray:
        return LocalRunner(cache, cfg.runner.rows_per_block), InMemorySAE(sae)
    from saescale.service.feature_pass import RayDataRunner, SavedSAE
    from saescale.service.ray_local import ensure_ray
    from saescale.service.stream import rebuild_hint

    ensure_ray(cfg.runner.address, num_cpus=cfg.runner.actors + 1)
    remedy = rebuild_hint(cache_url, cache.manifest.build_config, cfg.data.endpoint_url)
    runner = RayDataRunner(cache_url, cache.manifest, options, remedy, cfg.runner.rows_per_block, cfg.runner.actors)
    return runner, SavedSAE(storage.absolute(cfg.sae), options)


def explain(cfg: FeaturesJobConfig, lm, sae, manifest, latents, top, window_ids, test_windows, contexts) -> dict:
    """N2G explanations (evaluation.explain, all latents batched through the model together) from
    each latent's top contexts, scored on test windows that are not among its examples."""
    same_model = cfg.model is None or cfg.model == manifest.model
    from saescale.app.eval_job import padding_token
    from saescale.evaluation.explain import build_explanations, codes_activation_fn, score_explanation

    if not latents:
        return {}
    pad = padding_token(lm.tokenizer, cfg.explain.padding_text)

    def decode(token: int) -> str:
        return lm.tokenizer.decode([token])

    examples = {la: top[la][: cfg.explain.examples] for la in latents}
    explanations = build_explanations(
        codes_activation_fn(lm.model, sae, manifest.hook, manifest.layer),
        {la: [window_ids[w][: p + 1] for w, p, _ in ex] for la, ex in examples.items()},
        pad,
        cfg.explain.max_context,
        # the activations in full context are the cache's, when the model is the cache's own
        originals={la: [a for _, _, a in ex] for la, ex in examples.items()} if same_model else None,
    )
    out = {}
    for latent in latents:
        own = {w for w, _, _ in top[latent]}
        test = [w for w in test_windows if w not in own]
        if not test:
            continue
        windows = torch.tensor([window_ids[w] for w in test], dtype=torch.long)
        acts = torch.from_numpy(np.stack([contexts.get(w, latent) for w in test]))
        precision, recall, f1, firings = score_explanation(explanations[latent], windows, acts)
        out[latent] = {
            "patterns": explanations[latent].describe(decode),
            "precision": None if precision != precision else round(precision, 4),
            "recall": None if recall != recall else round(recall, 4),
            "f1": round(f1, 4),
            "test_windows": len(test),
            "test_firings": firings,
        }
    return out


def run_features(raw: DictConfig) -> dict:
    """The whole job; bad input exits 2 with one line and writes nothing (see `app.errors`)."""
    started = time.time()
    phases = Phases()
    try:
        cfg: FeaturesJobConfig = OmegaConf.to_object(raw)  # type: ignore[assignment]
        options = storage.endpoint_options(cfg.data.endpoint_url)
        check_job_paths(reads={"sae": cfg.sae}, writes={"output_dir": cfg.output_dir})
        sae, meta = load_sae(cfg.sae, storage_options=options)
        cache_url = cfg.data.cache or meta.get("cache") or DEFAULT_CACHE
        check_job_paths(reads={"data.cache": cache_url}, writes={})
        check_output_dir(cfg.output_dir, options)
        cache = ActivationCache(cache_url, options)
        manifest = cache.manifest
        check_cache_matches(meta, manifest, sae.cfg.d_in, cache_url)
        latents = choose_latents(cfg.features.latents, sae.cfg.n_latents, cfg.features.seed)
        n_shards = len(manifest.shards)
        if cfg.features.shards == "heldout" and cfg.data.holdout_shards > n_shards:
            raise ConfigError(f"data.holdout_shards={cfg.data.holdout_shards} but the cache has {n_shards} shards")
        shards = list(range(cfg.data.holdout_shards if cfg.features.shards == "heldout" else n_shards))
        runner, sae_source = make_runner(cfg, cache, cache_url, sae, options)
        from saescale.lm.models import load_causal_lm

        lm = load_causal_lm(cfg.model or manifest.model)  # early: a bad model fails before the passes
        check_model(lm, manifest.hook, manifest.layer)
    except USER_ERRORS as exc:
        fail(exc)
    phases.done("setup")
    f = cfg.features
    print0(
        f"features of {len(latents)} of {sae.cfg.n_latents} latents over {len(shards)} {f.shards} shard(s) of "
        f"{storage.redact(cache_url)} ({manifest.model} {manifest.hook}.{manifest.layer})"
    )
    try:
        sample = f.quantile_bins * f.per_bin * OVERSAMPLE
        sketch = merge_sketches(
            runner.run(SketchWork(sae_source, latents, f.top, sample, f.seed), shards, "statistics")
        )
        table = cache.windows()
        if sketch is None or sketch.tokens == 0:
            raise ConfigError(f"the chosen shards {shards} of {storage.redact(cache_url)} hold no rows")
    except USER_ERRORS as exc:  # a damaged shard or unreachable storage
        fail(exc)
    phases.done("statistics")
    stats = sketch.statistics()
    top = {int(la): sketch.top_of(int(la)) for la in latents}
    samples = {int(la): sketch.quantile_samples(int(la), f.quantile_bins, f.per_bin) for la in latents}
    firing = [int(la) for la, d in zip(latents, stats["density"]) if d > 0]
    print0(f"{len(firing)} of {len(latents)} latents fired on {sketch.tokens} tokens")

    rng = np.random.default_rng(f.seed)
    explained = sorted(rng.permutation(firing)[: cfg.explain.latents].tolist()) if cfg.explain.latents else []
    full = windows_of_length(table, manifest.context_length)
    test_windows = sorted(rng.permutation(full)[: cfg.explain.test_windows].tolist()) if explained else []
    if explained and not test_windows:
        print0(f"no window of the full {manifest.context_length} tokens to score explanations on: none scored")
    wins, lats = [], []
    for la in latents.tolist():
        for w, _, _ in top[la]:
            wins.append(w), lats.append(la)
        for s in samples[la]:
            wins.append(s["window"]), lats.append(la)
    for la in explained:
        wins.extend(test_windows), lats.extend([la] * len(test_windows))
    window_ids = window_tokens(table, set(wins))  # only the windows shown or scored: O(examples)
    pairs = np.unique(pair_keys(np.asarray(wins, np.int64), np.asarray(lats, np.int64), sae.cfg.n_latents))
    try:
        if len(pairs):
            parts = runner.run(ContextWork(sae_source, pairs, sae.cfg.n_latents), list(range(n_shards)), "contexts")
        else:  # no latent fired: nothing to look up
            parts = iter(())
        contexts = gather_contexts(parts, manifest.context_length)
    except USER_ERRORS as exc:
        fail(exc)
    phases.done("contexts")

    from saescale.features.effects import decoder_neighbours, logit_effects

    try:
        effects = logit_effects(lm.model, sae, latents.tolist(), f.logits) if f.logits else [None] * len(latents)
        neighbours = decoder_neighbours(sae, latents.tolist(), f.neighbours) if f.neighbours else [[]] * len(latents)
        phases.done("effects")
        explanations = explain(cfg, lm, sae, manifest, explained, top, window_ids, test_windows, contexts)
    except USER_ERRORS as exc:
        fail(exc)
    phases.done("explanations")
    found = Found(latents, sketch, stats, top, samples, contexts, effects, neighbours, explanations, window_ids)
    result = write_features(cfg, raw, sae, manifest, cache_url, found, lm, options)
    phases.done("write")
    result["wall_s"] = round(time.time() - started, 1)
    result["phase_s"] = phases.seconds
    print0(
        f"features of {len(latents)} latents -> {storage.redact(cfg.output_dir)} in {result['wall_s']} s "
        f"({', '.join(f'{k} {v:.1f}' for k, v in phases.seconds.items())})"
    )
    return result


@dataclass
class Found:
    """What the passes and the model found, per latent (what the pages are built from)."""

    latents: np.ndarray
    sketch: LatentSketch
    stats: dict[str, np.ndarray]
    top: dict[int, list[tuple[int, int, float]]]
    samples: dict[int, list[dict]]
    contexts: WindowActivations
    effects: list[dict | None]
    neighbours: list[list[tuple[int, float]]]
    explanations: dict[int, dict]
    window_ids: dict[int, list[int]]


def write_features(
    cfg: FeaturesJobConfig, raw: DictConfig, sae, manifest, cache_url: str, found: Found, lm, options
) -> dict:
    """Build every feature's record, write the folder aside, publish it, log the wandb cards."""
    latents, sketch, stats, top, samples = found.latents, found.sketch, found.stats, found.top, found.samples
    effects, neighbours, window_ids = found.effects, found.neighbours, found.window_ids
    from saescale.features.pages import (
        context,
        decimals_for,
        feature_record,
        histogram,
        json_number,
        write_neuronpedia,
        write_site,
    )

    used = {w for la in latents.tolist() for w, _, _ in top[la]} | {
        s["window"] for la in latents.tolist() for s in samples[la]
    }
    logit_ids = [t for e in effects if e for side in ("promoted", "suppressed") for t, _ in e[side]]
    text = token_strings(lm.tokenizer, [t for w in used for t in window_ids[w]] + logit_ids)
    windows = {w: [text[t] for t in window_ids[w]] for w in used}
    records = []
    sparse = found.contexts.sparse()
    edges = [json_number(e) for e in HIST_EDGES]
    for slot, la in enumerate(latents.tolist()):
        places = decimals_for(float(stats["max"][slot]))
        ex_top = [context({"window": w, "pos": p, "act": a}, sparse.get((w, la)), places) for w, p, a in top[la]]
        ex_smp = [context(s, sparse.get((s["window"], la)), places) for s in samples[la]]
        e = effects[slot]
        logits = (
            {side: [[text[t], round(v, 4)] for t, v in e[side]] for side in ("promoted", "suppressed")}
            if e
            else {"promoted": [], "suppressed": []}
        )
        row = {k: float(v[slot]) for k, v in stats.items()}
        records.append(
            feature_record(
                la,
                row,
                histogram(sketch.hist[slot], edges),
                ex_top,
                ex_smp,
                logits,
                neighbours[slot],
                found.explanations.get(la),
            )
        )
    info = {
        "sae": storage.redact(cfg.sae),
        "cache": storage.redact(cache_url),
        "model": manifest.model,
        "hook": f"{manifest.hook}.{manifest.layer}",
        "n_latents": sae.cfg.n_latents,
        "k": sae.cfg.k,
        "shown": len(records),
        "tokens": sketch.tokens,
        "shards": cfg.features.shards,
        "context_length": manifest.context_length,
        "explained": len(found.explanations),
    }
    model_id = manifest.model.split(":")[-1].split("/")[-1]
    source = f"{manifest.layer}-{manifest.hook}-saescale"

    def neuronpedia(folder: str) -> None:
        write_neuronpedia(
            folder, model_id, source, info["hook"], records, windows, lambda la: sae.W_dec[la].detach().numpy()
        )

    out = cfg.output_dir
    remote = storage.is_remote(out)
    parent = None if remote else os.path.dirname(os.path.abspath(storage.local_path(out) or out))
    if parent:
        os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".features-", dir=parent) as stage:
        folder = os.path.join(stage, "features")
        write_site(folder, info, records, windows, neuronpedia if cfg.features.neuronpedia else None)
        try:
            storage.publish_folder(
                folder, out, options if remote else None, last=("data/index.js", "index.json", "index.html")
            )
        except USER_ERRORS as exc:
            fail(exc)
    if cfg.wandb.active and cfg.features.wandb_cards:
        log_cards(cfg, raw, records, windows)
    explained = [r["explanation"] for r in records if r["explanation"]]
    f1 = [e["f1"] for e in explained]
    return {
        "output_dir": storage.redact(out),
        "latents": len(records),
        "tokens": sketch.tokens,
        "firing": int(sum(1 for r in records if r["density"])),
        "explained": len(explained),
        "mean_f1": float(np.mean(f1)) if f1 else None,
    }


def log_cards(cfg: FeaturesJobConfig, raw: DictConfig, records: list[dict], windows: dict[int, list[str]]) -> None:
    """A wandb Table of feature cards: the densest-to-rarest spread of latents that fire, each
    with its statistics, explanation and top contexts (the firing token in [[ ]])."""
    from saescale.train.loggers import WandbLogger

    firing = sorted((r for r in records if r["density"]), key=lambda r: -r["density"])
    step = max(1, len(firing) // cfg.features.wandb_cards)
    rows = []
    for r in firing[::step][: cfg.features.wandb_cards]:
        shown = []
        for ex in r["top"][:3]:
            toks = windows.get(ex["window"], [])
            p = ex["pos"]
            shown.append("".join(toks[max(0, p - 12) : p]) + f"[[{toks[p] if p < len(toks) else ''}]]")
        e = r["explanation"]
        rows.append(
            [r["latent"], r["density"], r["max"], e["patterns"][0] if e and e["patterns"] else "", "\n".join(shown)]
        )
    logger = WandbLogger(
        cfg.wandb.project,
        f"features-{cfg.run_name}",
        cfg.wandb.group,
        ["features"],
        json.loads(storage.redact(json.dumps(OmegaConf.to_container(raw, resolve=True)))),  # no URL credentials
        cfg.wandb.mode,
        storage.local_path(os.path.dirname(cfg.output_dir.rstrip("/")))
        if not storage.is_remote(cfg.output_dir)
        else None,
    )
    logger.log_table("features/cards", ["latent", "density", "max", "explanation", "top contexts"], rows, 0)
    logger.close()
