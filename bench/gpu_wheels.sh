#!/usr/bin/env bash
# Fetch the wheels that bench/gpu_check.sh needs on the GPU machine and its image lacks
# (bench/gpu_wheels.txt), for that image's Python 3.12 on x86-64, into .whl/ (ignored by git).
# The GPU machine has no internet: the device call carries .whl/ and gpu_check.sh installs it.
#
#   make gpu-wheels        # or: PIP=.venv/bin/pip bash bench/gpu_wheels.sh [DEST]
#
# A release with a wheel is downloaded for the target platform; one published only as an sdist
# (all pure Python here) is built into a py3 wheel on this machine.
set -euo pipefail

PIP=${PIP:-.venv/bin/pip}
DEST=${1:-.whl}
LIST=${LIST:-bench/gpu_wheels.txt}
TARGET_PY=${TARGET_PY:-3.12}
LIMIT_MB=${LIMIT_MB:-56}  # the device call carries at most 64 MiB with the working tree
PLATFORMS=()
for tag in manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
    PLATFORMS+=(--platform "${tag}_x86_64")
done

mkdir -p "$DEST"
built=()
while read -r requirement; do
    case "$requirement" in '' | '#'*) continue ;; esac
    if ! "$PIP" download --quiet --no-deps --only-binary=:all: --python-version "$TARGET_PY" \
        --implementation cp "${PLATFORMS[@]}" -d "$DEST" "$requirement" 2>/dev/null; then
        "$PIP" wheel --quiet --no-deps -w "$DEST" "$requirement"
        built+=("$requirement")
    fi
done <"$LIST"

count=$(find "$DEST" -name '*.whl' | wc -l)
mb=$(du -sm "$DEST" | cut -f1)
echo "gpu-wheels: $count wheels, ${mb} MB in $DEST${built:+ (built here from sdists: ${built[*]})}"
if [ "$mb" -gt "$LIMIT_MB" ]; then
    echo "gpu-wheels: $DEST is over ${LIMIT_MB} MB, too much to carry with the working tree (64 MiB)" >&2
    exit 1
fi
