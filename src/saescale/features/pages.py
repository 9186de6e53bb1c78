"""The feature pages on disk: per-feature JSON with an index, a Neuronpedia-format export, and
the static viewer (`static/`: plain HTML, JS and CSS, no build step, no network).

Layout of `output_dir/features/`:
    index.html, viewer.js, viewer.css   the viewer (open index.html from disk, or `saescale view`)
    index.json                          the run and one summary row per feature
    windows.json                        window id -> its tokens (the contexts refer to windows)
    latents/<id>.json                   one feature (schema FEATURE_SCHEMA, see README)
    data/*.js                           the same data as scripts (a page opened from disk may load
                                        scripts but not fetch JSON): index.js, features-<n>.js (64
                                        features each), windows-<n>.js (256 window ids each)
    neuronpedia/<model>/<source>/       features/ and activations/ as gzipped JSONL batches
"""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np

INDEX_SCHEMA = "saescale.features.v1"
FEATURE_SCHEMA = "saescale.feature.v1"
CHUNK = 64  # features per data/features-<n>.js file
WINDOW_SHARD = 256  # windows per data/windows-<n>.js file (window id // 256)
NEURONPEDIA_BATCH = 1024
GZIP_LEVEL = 1  # level 9 (gzip's default) took 28 s of a 90 s run for 4096 features; 1 is ~5x faster
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
STATIC_FILES = ("index.html", "viewer.js", "viewer.css")


def json_number(x: float, digits: int = 4) -> float | None:
    """JSON-safe and short: NaN/inf -> null, else `digits` significant digits."""
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def decimals_for(largest: float, digits: int = 4) -> int:
    """Decimal places that keep `digits` significant digits of the largest value."""
    return max(0, digits - 1 - math.floor(math.log10(largest))) if largest > 0 else digits


def histogram(counts: np.ndarray, edges: list[float]) -> dict:
    """The non-empty span of a fixed-bin histogram (`edges` already rounded for JSON)."""
    nz = np.flatnonzero(counts)
    if not len(nz):
        return {"edges": [], "counts": []}
    lo, hi = int(nz[0]), int(nz[-1]) + 1
    return {"edges": edges[lo : hi + 1], "counts": counts[lo:hi].tolist()}


def context(example: dict, acts: list[tuple[int, float]] | None, decimals: int) -> dict:
    """An example (window, position, activation, ...) with its activation at every token, as
    [[position, activation], ...] of the nonzero positions (every other position is 0)."""
    out = dict(example)
    out["act"] = round(out["act"], decimals)
    if "bin_min" in out:
        out["bin_min"], out["bin_max"] = round(out["bin_min"], decimals), round(out["bin_max"], decimals)
        out["bin_share"] = round(out["bin_share"], 4)
    out["acts"] = [[p, round(v, decimals)] for p, v in acts] if acts else [[example["pos"], out["act"]]]
    return out


def feature_record(
    latent: int,
    stats: dict[str, float],
    hist: dict,
    top: list[dict],
    samples: list[dict],
    logits: dict,
    neighbours: list[tuple[int, float]],
    explanation: dict | None,
) -> dict:
    return {
        "schema": FEATURE_SCHEMA,
        "latent": latent,
        **{k: json_number(v, 6) for k, v in stats.items()},
        "histogram": hist,
        "top": top,
        "samples": samples,
        "logits": logits,
        "neighbours": [[i, round(c, 4)] for i, c in neighbours],
        "explanation": explanation,
    }


def summary_row(record: dict, windows: dict[int, list[str]]) -> dict:
    """What the feature list shows and searches: statistics, the tokens it fires on most,
    the tokens it promotes, its explanation."""
    firing: list[str] = []
    for ex in record["top"]:
        token = windows.get(ex["window"], [])[ex["pos"] : ex["pos"] + 1]
        if token and token[0] not in firing:
            firing.append(token[0])
    e = record["explanation"]
    return {
        "latent": record["latent"],
        "density": record["density"],
        "mean": record["mean"],
        "max": record["max"],
        "top_tokens": firing[:6],
        "promoted": [t for t, _ in record["logits"]["promoted"][:6]],
        "explanation": e["patterns"][0] if e and e["patterns"] else None,
        "f1": e["f1"] if e else None,
    }


def _js(name: str, payload: Any) -> str:
    return f"window.saescale.{name}({json.dumps(payload, separators=(',', ':'))});\n"


def write_site(
    folder: str,
    info: dict,
    records: list[dict],
    windows: dict[int, list[str]],
    neuronpedia: Callable[[str], None] | None = None,
) -> None:
    """Write the whole features folder (viewer, JSON, scripts) into `folder` (a local staging
    folder: the job publishes it in one step)."""
    os.makedirs(os.path.join(folder, "latents"), exist_ok=True)
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    rows = [summary_row(r, windows) for r in records]
    chunks = {r["latent"]: i // CHUNK for i, r in enumerate(records)}
    index = {
        "schema": INDEX_SCHEMA,
        **info,
        "chunk_of": {str(k): v for k, v in chunks.items()},
        "window_shard": WINDOW_SHARD,
        "features": rows,
    }
    texts = [json.dumps(r, separators=(",", ":")) for r in records]  # each record serialised once
    for record, text in zip(records, texts):
        with open(os.path.join(folder, "latents", f"{record['latent']}.json"), "w") as handle:
            handle.write(text)
    window_json = {str(w): t for w, t in sorted(windows.items())}
    with open(os.path.join(folder, "windows.json"), "w") as handle:
        handle.write(json.dumps(window_json, separators=(",", ":")))
    with open(os.path.join(folder, "index.json"), "w") as handle:
        handle.write(json.dumps(index, separators=(",", ":")))
    for start in range(0, len(records), CHUNK):
        body = ",".join(
            f'"{r["latent"]}":{t}' for r, t in zip(records[start : start + CHUNK], texts[start : start + CHUNK])
        )
        with open(os.path.join(folder, "data", f"features-{start // CHUNK}.js"), "w") as handle:
            handle.write(f'window.saescale.chunk({{"chunk":{start // CHUNK},"features":{{{body}}}}});\n')
    shards: dict[int, dict[str, list[str]]] = {}
    for w, tokens in window_json.items():  # the windows' tokens, once each, in shards by window id
        shards.setdefault(int(w) // WINDOW_SHARD, {})[w] = tokens
    for n, part in shards.items():
        with open(os.path.join(folder, "data", f"windows-{n}.js"), "w") as handle:
            handle.write(_js("windows", part))
    with open(os.path.join(folder, "data", "index.js"), "w") as handle:
        handle.write(_js("index", index))
    for name in STATIC_FILES:
        shutil.copyfile(os.path.join(STATIC_DIR, name), os.path.join(folder, name))
    if neuronpedia is not None:
        neuronpedia(folder)


def write_neuronpedia(
    folder: str, model_id: str, source: str, hook_name: str, records: list[dict], windows: dict[int, list[str]], vectors
) -> str:
    """Neuronpedia's upload layout (the field names of its feature and activation records):
    `neuronpedia/<model>/<source>/{features,activations}/batch-<n>.jsonl.gz`. `vectors(latent)`
    gives the decoder row."""
    root = os.path.join(folder, "neuronpedia", model_id, source)
    for sub in ("features", "activations"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    with open(os.path.join(root, "source.jsonl"), "w") as handle:
        handle.write(json.dumps({"id": source, "modelId": model_id, "hookName": hook_name}) + "\n")
    for b, start in enumerate(range(0, len(records), NEURONPEDIA_BATCH)):
        batch = records[start : start + NEURONPEDIA_BATCH]
        with gzip.open(os.path.join(root, "features", f"batch-{b}.jsonl.gz"), "wt", compresslevel=GZIP_LEVEL) as handle:
            for r in batch:
                hist = r["histogram"]
                centres = [
                    json_number(math.sqrt(lo * hi))
                    for lo, hi in zip(hist["edges"][:-1], hist["edges"][1:])
                    if lo and hi
                ]
                handle.write(
                    json.dumps(
                        {
                            "modelId": model_id,
                            "layer": source,
                            "index": str(r["latent"]),
                            "hookName": hook_name,
                            "maxActApprox": r["max"],
                            "frac_nonzero": r["density"],
                            "pos_str": [t for t, _ in r["logits"]["promoted"]],
                            "pos_values": [v for _, v in r["logits"]["promoted"]],
                            "neg_str": [t for t, _ in r["logits"]["suppressed"]],
                            "neg_values": [v for _, v in r["logits"]["suppressed"]],
                            "topkCosSimIndices": [i for i, _ in r["neighbours"]],
                            "topkCosSimValues": [c for _, c in r["neighbours"]],
                            "freq_hist_data_bar_heights": hist["counts"],
                            "freq_hist_data_bar_values": centres,
                            "hasVector": True,
                            "vector": np.round(np.asarray(vectors(r["latent"]), np.float64), 6).tolist(),
                        }
                    )
                    + "\n"
                )
        with gzip.open(
            os.path.join(root, "activations", f"batch-{b}.jsonl.gz"), "wt", compresslevel=GZIP_LEVEL
        ) as handle:
            for r in batch:
                for kind, examples in (("top", r["top"]), ("sample", r["samples"])):
                    for n, ex in enumerate(examples):
                        tokens = windows.get(ex["window"], [])
                        values = [0.0] * len(tokens)
                        for p, v in ex["acts"]:
                            if p < len(values):
                                values[p] = v
                        record = {
                            "id": f"{source}-{r['latent']}-{kind}-{n}",
                            "modelId": model_id,
                            "layer": source,
                            "index": str(r["latent"]),
                            "tokens": tokens,
                            "values": values,
                            "maxValue": max(values, default=0.0),
                            "maxValueTokenIndex": int(np.argmax(values)) if values else 0,
                            "minValue": min(values, default=0.0),
                            "dataIndex": str(ex["window"]),
                        }
                        if kind == "sample":
                            record.update(binMin=ex["bin_min"], binMax=ex["bin_max"], binContains=ex["bin_share"])
                        handle.write(json.dumps(record) + "\n")
    return root
