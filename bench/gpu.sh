#!/usr/bin/env bash
# Issue 7's GPU measurement and the gpu test tier in one call on a lent GPU machine:
#   lftk bench on the SD 1.5 architecture (random weights: timings do not depend on their values) at
#   128 px, 100 steps, 15 frames: torch fp32 (the parity reference), fp16 eager and --compile;
#   then `pytest -m gpu`. Everything printed is also written to $OUT (what the device tool brings
#   back), or to bench/results/gpu-run when OUT is unset.
#
# Here, first: bash bench/gpu_wheels.sh (the packages that machine lacks, into .whl/).
# Then the device tool: run(command="bash bench/gpu.sh", carry=[".whl"]), about 5 to 8 minutes on
# an H100. Commit the printed table under bench/results/ with the device name and date.
#
# Settings (environment): STEPS=100 FRAMES=15 RES=128 REPEATS=2 COMPILE=1 TESTS=1.
# Elsewhere (a CPU) it runs as a smoke test of the script with small settings, e.g.
#   STEPS=1 FRAMES=2 RES=64 REPEATS=1 COMPILE=0 TESTS=0 OUT=/tmp/gpu-smoke bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-100} FRAMES=${FRAMES:-15} RES=${RES:-128} REPEATS=${REPEATS:-2} COMPILE=${COMPILE:-1} TESTS=${TESTS:-1}
OUT=${OUT:-bench/results/gpu-run}
WORK=${WORK:-/tmp/lftk-gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1

if ! "$PY" -c "import lftk" 2>/dev/null; then  # a bare machine: install the carried wheels and lftk itself
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "lftk is not installed and no wheels were carried: run bash bench/gpu_wheels.sh here, carry .whl" >&2
        exit 2
    fi
    site="$WORK/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$site" .
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
lftk() { "$PY" -c 'from lftk.cli import main; main()' "$@"; }

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi: not a GPU machine"
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
    lftk doctor
} 2>&1 | tee "$OUT/machine.txt"

base="$WORK/sd15"
[ -f "$base/model_index.json" ] || lftk init-base "$base" --preset sd15 2>&1 | tail -n 2
compile=()
[ "$COMPILE" = 1 ] && compile=(--compile)
name="bench-sd15-${RES}px-${STEPS}steps"
lftk bench --model "$base" --backends torch "${compile[@]}" --resolution "$RES" --steps "$STEPS" --frames "$FRAMES" \
    --repeats "$REPEATS" --json "$OUT/$name.json" --log "$OUT/bench_log.jsonl" 2>&1 | tee "$OUT/$name.txt"

if [ "$TESTS" = 1 ]; then
    set +e
    # Only the files that hold gpu tests: the others import packages (pybullet, deepspeed, ...) a bare
    # CUDA image lacks, and one import error at collection would stop the whole run.
    mapfile -t gpu_files < <(grep -l "mark.gpu" tests/test_*.py)
    "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider "${gpu_files[@]}" 2>&1 | tee "$OUT/pytest-gpu.txt"
    status=${PIPESTATUS[0]}
    set -e
    [ "$status" = 0 ] || { echo "pytest -m gpu exited $status" >&2; exit "$status"; }
fi
