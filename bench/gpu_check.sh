#!/usr/bin/env bash
# A prepared check for a machine with one NVIDIA GPU; not part of the test suite.
#
#   bash bench/gpu_check.sh [all|env|tests|kernels|peers|step|precision|train]    # from the repo root; default all
#
# Which Python: $PY if set, else .venv/bin/python when its torch sees a GPU (`make install
# TORCH=torch` on a GPU machine with internet), else python3 (the device tool's image: a CUDA torch,
# triton, transformers and pytest, no internet). saescale runs from src/ (PYTHONPATH), so it need not
# be installed. The peers' libraries (sparsify, SAELens) and what they need beyond the image are
# wheels fetched beforehand with `make gpu-wheels` into .whl/; when .whl/ is here this script
# installs them into a temporary folder first. From this machine, one device call:
#
#   run(command="bash bench/gpu_check.sh all", carry=[".whl"], timeout_s=540)
#
# The train section needs Ray and Hydra (the image has neither, and Ray's wheel is too large to
# carry): without them it prints a skipped line.
#
# Prints one JSON object per line:
#   {"check": "env", ...}        nvidia-smi's GPU, torch and CUDA versions
#   {"check": "tests", ...}      pytest tests/test_cuda.py (the CUDA step against the CPU's; whole sync-free
#                                trainer steps under torch.cuda.set_sync_debug_mode("error")), with the
#                                Triton kernels' and the sync-free step's CPU tests beside them
#   {"check": "kernels", ...}    saescale bench kernels --device cuda: each sparse product, embedding_bag
#                                against Triton (triton_over_torch < 1: Triton wins; issue 21 adopts a
#                                kernel as train.sparse_kernels' default only where it does), bf16,
#                                at the two issue-21 sizes
#   {"check": "step", ...}       saescale bench step --device cuda --no-naive, d=4096, k=32, batch
#                                8192: n = 2^20 in bf16 and fp32, 2^22 in bf16; micro-batches chosen
#                                by `saescale plan --micro-batches auto` for this GPU's memory, and a
#                                size the planner rejects is reported as skipped, not run
#   {"check": "peers", ...}      saescale bench step --device cuda --peers sparsify,saelens: the peers' own
#                                step beside ours (peer_over_step = our tokens/s over theirs), n=65536,
#                                d=576, k=32, batch 4096, bf16 then fp32 (sparsify runs its own bf16
#                                autocast on CUDA either way); the step is sync-free (host_syncs_per_step
#                                0); then the same bf16 step compiled (--cuda-graphs on: CUDA graphs),
#                                with --kernels triton, and with --sync-free off
#   {"check": "precision", ...}  saescale bench precision --device cuda (fp32 vs bf16 NMSE drift)
#   {"check": "cache"|"train"}   jobs/cache.py, then a 20-step Ray Train job on the GPU
# Every command runs under a timeout; a failure or timeout is reported in its line (ok=false, rc,
# the end of its stderr) and the script goes on. The sections let a runner with a per-command
# limit split the work (the whole script takes several minutes on an H100/H200).
set -u

SECTION=${1:-all}
STEP_TIMEOUT=${STEP_TIMEOUT:-240}
JOB_TIMEOUT=${JOB_TIMEOUT:-300}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export WANDB_MODE=disabled
WORK=$(mktemp -d "${TMPDIR:-/tmp}/saescale-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
        PY=.venv/bin/python
    else
        PY=python3
    fi
fi
SITE=""
if [ -d .whl ] && ! "$PY" -c "import sparsify, sae_lens" >/dev/null 2>&1; then
    # the carried wheels, without their dependencies (the list is already closed over what the image lacks)
    if "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" .whl/*.whl \
        >"$WORK/pip" 2>&1; then
        SITE=$WORK/site
    else
        echo "gpu_check.sh: installing .whl/ failed (the peers will fail): $(tail -3 "$WORK/pip")" >&2
    fi
fi
export PYTHONPATH="$PWD/src${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"

case "$SECTION" in
    all | env | tests | kernels | step | peers | precision | train) ;;
    *)
        echo "gpu_check.sh: unknown section '$SECTION'; use one of all, env, tests, kernels, step, peers, precision, train" >&2
        exit 2
        ;;
esac

# report NAME RC START END STDOUT_FILE STDERR_FILE EXTRA_JSON CMD...: one JSON line for one command
report() {
    "$PY" - "$@" <<'EOF'
import json
import sys

name, rc, start, end, out, err, extra, *cmd = sys.argv[1:]
rc = int(rc)
seconds = round(float(end) - float(start), 1)
line = {"check": name, **json.loads(extra), "ok": rc == 0, "rc": rc, "seconds": seconds}
if rc in (124, 137):
    line["timed_out"] = True
stdout = open(out).read().strip().splitlines()
try:
    line["result"] = json.loads(stdout[-1]) if stdout else None
except json.JSONDecodeError:
    line["stdout_tail"] = stdout[-5:]
if rc != 0:
    line["stderr_tail"] = open(err).read().strip().splitlines()[-15:]
line["cmd"] = " ".join(cmd)
print(json.dumps(line), flush=True)
EOF
}

# check NAME TIMEOUT EXTRA_JSON CMD...: run CMD under a timeout and report it
check() {
    local name=$1 limit=$2 extra=$3 rc start end
    shift 3
    start=$(date +%s.%N)
    timeout --kill-after=30 "$limit" "$@" >"$WORK/out" 2>"$WORK/err"
    rc=$?
    end=$(date +%s.%N)
    report "$name" "$rc" "$start" "$end" "$WORK/out" "$WORK/err" "$extra" "$@"
}

env_check() {
    local smi
    smi=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)
    "$PY" - "$smi" <<'EOF'
import json
import sys

import torch

line = {"check": "env", "nvidia_smi": sys.argv[1], "python": sys.executable, "torch": torch.__version__}
line["torch_cuda"] = torch.version.cuda
for name in ("triton", "transformers", "sparsify", "sae_lens", "ray"):
    try:
        line[name] = getattr(__import__(name), "__version__", "imported")
    except Exception as error:  # noqa: BLE001 - reported, not raised: the line says what is missing
        line[name] = f"missing ({type(error).__name__})"
line["cuda_available"] = torch.cuda.is_available()
if line["cuda_available"]:
    props = torch.cuda.get_device_properties(0)
    line.update(gpu=props.name, gpu_gib=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
print(json.dumps(line), flush=True)
EOF
}

gpu_gib() {
    "$PY" -c "import torch; print(torch.cuda.get_device_properties(0).total_memory / 2**30)" 2>/dev/null || echo 80
}

step_checks() {
    local gib n p plan mb extra
    gib=$(gpu_gib)
    local pair
    for pair in 1048576:bf16 1048576:fp32 4194304:bf16; do  # issue 21's size (2^20) first
        n=${pair%%:*} p=${pair##*:}
        extra="{\"n_latents\": $n, \"precision\": \"$p\"}"
        plan=$("$PY" -m saescale.cli plan --n-latents "$n" --d-model 4096 --k 32 --workers 1 --tp 1 \
            --batch 8192 --micro-batches auto --precision "$p" --device-gib "$gib" --json 2>"$WORK/plan_err")
        if [ $? -ne 0 ]; then
            "$PY" - "$extra" "$WORK/plan_err" <<'EOF'
import json
import sys

why = open(sys.argv[2]).read().strip().splitlines()
print(json.dumps({"check": "step", **json.loads(sys.argv[1]), "skipped": why[-1] if why else "planner failed"}))
EOF
            continue
        fi
        mb=$(echo "$plan" | "$PY" -c "import json, sys; print(json.load(sys.stdin)['micro_batches'])")
        check step "$STEP_TIMEOUT" "${extra%\}}, \"micro_batches\": $mb}" \
            "$PY" -m saescale.cli bench step --device cuda --no-naive --d-in 4096 --n-latents "$n" --k 32 \
            --batch 8192 --precision "$p" --micro-batches "$mb" --repeats 3 --warmup 1 --threads "$(nproc)"
    done
}

SMALL=(--d-in 576 --n-latents 65536 --k 32 --batch 4096)

peer_checks() {
    local p variant
    for p in bf16 fp32; do
        check peers "$STEP_TIMEOUT" "{\"n_latents\": 65536, \"precision\": \"$p\"}" \
            "$PY" -m saescale.cli bench step --device cuda --no-naive "${SMALL[@]}" \
            --precision "$p" --peers sparsify,saelens --repeats 7 --warmup 2 --threads "$(nproc)"
    done
    for variant in "--cuda-graphs on" "--kernels triton" "--sync-free off"; do
        # shellcheck disable=SC2086 # the variant is two words on purpose
        check step_variant "$STEP_TIMEOUT" "{\"n_latents\": 65536, \"precision\": \"bf16\", \"variant\": \"$variant\"}" \
            "$PY" -m saescale.cli bench step --device cuda --no-naive "${SMALL[@]}" --precision bf16 $variant \
            --repeats 7 --warmup 2 --threads "$(nproc)"
    done
}

kernel_checks() {
    check kernels "$STEP_TIMEOUT" '{"size": "small"}' \
        "$PY" -m saescale.cli bench kernels --device cuda "${SMALL[@]}" --dtype bfloat16
    check kernels "$STEP_TIMEOUT" '{"size": "large"}' \
        "$PY" -m saescale.cli bench kernels --device cuda --d-in 4096 --n-latents 1048576 --k 32 --batch 8192 \
        --dtype bfloat16 --repeats 10
}

gpu_tests() {
    check tests "$JOB_TIMEOUT" '{}' "$PY" -m pytest -q tests/test_cuda.py tests/test_sync_free.py
    # a process of its own: on a CPU that file switches Triton to its interpreter at import
    check tests "$JOB_TIMEOUT" '{"file": "test_triton_kernels"}' "$PY" -m pytest -q tests/test_triton_kernels.py
}

precision_check() {
    check precision "$STEP_TIMEOUT" '{}' "$PY" -m saescale.cli bench precision --device cuda --precision bf16 fp16
}

train_checks() {
    if ! "$PY" -c "import ray, hydra" >/dev/null 2>&1; then
        echo '{"check": "train", "skipped": "Ray or Hydra is not installed for '"$PY"' (the device image has neither)"}'
        return
    fi
    check cache "$JOB_TIMEOUT" '{}' "$PY" jobs/cache.py
    check train "$JOB_TIMEOUT" '{}' "$PY" jobs/train.py parallel.use_gpu=true parallel.workers=1 parallel.tp=1 \
        train.max_steps=20 train.log_every=5 wandb.enabled=false export.saelens=false export.sparsify=false \
        run_id=gpu-check "output_dir=$WORK/train" "storage.url=$WORK/ray"
    if [ -f "$WORK/train/result.json" ]; then
        "$PY" -c "import json, sys; print(json.dumps({'check': 'train_result', **json.load(open(sys.argv[1]))}))" \
            "$WORK/train/result.json"
    fi
}

case "$SECTION" in
    env) env_check ;;
    tests) gpu_tests ;;
    kernels) kernel_checks ;;
    step) step_checks ;;
    peers) peer_checks ;;
    precision) precision_check ;;
    train) train_checks ;;
    all)
        env_check
        gpu_tests
        peer_checks
        kernel_checks
        step_checks
        precision_check
        train_checks
        ;;
esac
