#!/usr/bin/env bash
# data.source=model against the cached path on the embedded default (issue: training without a
# stored cache). Not part of the test suite; takes ~15 min on a 2-core machine.
#
#   bash bench/stream_vs_cache.sh [OUT] [TOKENS] [extra train.py overrides...]
#
# 1. the default SAE trained from the model stream on TOKENS tokens (default 400000, one epoch),
#    writing its activations through to OUT/written-cache;
# 2. the same SAE trained from that cache (the cached path, shard 0 held out as usual);
# 3. both scored on the streamed run's held-out cache (the documents after the budget: neither
#    run trained on them), and the written cache checked shard by shard against its manifest.
# Prints one JSON line: both runs' held-out NMSE, dead fractions, steps, wall times, data wait.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${1:-$(mktemp -d "${TMPDIR:-/tmp}/saescale-stream.XXXXXX")}
TOKENS=${2:-400000}
mkdir -p "$OUT"
shift $(( $# > 2 ? 2 : $# ))
export SAESCALE_RUNS=$OUT WANDB_MODE=offline
COMMON=(train.epochs=1 wandb.mode=offline "$@")
$PY jobs/train.py run_id=streamed data.source=model data.lm.max_tokens=$TOKENS \
    data.cache_write=$OUT/written-cache "${COMMON[@]}" > "$OUT/streamed.log" 2>&1
$PY jobs/train.py run_id=cached data.cache=$OUT/written-cache "${COMMON[@]}" > "$OUT/cached.log" 2>&1
$PY - "$OUT" <<'PY'
import json, sys, torch
from saescale.data.reader import ActivationCache
from saescale.evaluation.reconstruction import reconstruction_metrics
from saescale.formats.saved import load_sae

out = sys.argv[1]
written = ActivationCache(f"{out}/written-cache")
checked = sum(written.read_shard(s).shape[0] for s in range(len(written.manifest.shards)))  # sha256 each
held = ActivationCache(f"{out}/streamed/heldout-cache")
rows = torch.cat([held.read_shard(s) for s in range(len(held.manifest.shards))])
report = {"bench": "stream_vs_cache", "heldout": held.manifest.build_config, "heldout_rows": rows.shape[0],
          "written_cache_rows_checked": checked, "written_cache_rows": written.manifest.n_rows}
for name in ("streamed", "cached"):
    result = json.load(open(f"{out}/{name}/result.json"))
    sae, _ = load_sae(f"{out}/{name}/sae")
    with torch.no_grad():
        m = reconstruction_metrics(sae, rows, with_density=False)
    report[name] = {"nmse_on_stream_heldout": m.nmse, "dead_fraction": result["dead_fraction"],
                    "own_heldout_nmse": result.get("heldout_nmse"), "steps": result["steps"],
                    "tokens": result["tokens"], "train_wall_s": result["train_wall_s"],
                    "data_wait_frac": result["data_wait_frac"]}
s, c = report["streamed"]["nmse_on_stream_heldout"], report["cached"]["nmse_on_stream_heldout"]
report["relative_nmse_gap"] = (s - c) / c
print(json.dumps(report))
PY
