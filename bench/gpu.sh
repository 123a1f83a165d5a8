#!/usr/bin/env bash
# The standing GPU checklist, in one call on a lent GPU machine; everything printed is also written to
# $OUT (what the device tool brings back), or to bench/results/gpu-run when OUT is unset:
#   1. inventory: GPU, driver, CUDA, python, torch, and which of deepspeed, bitsandbytes, diffusers,
#      peft, transformers, onnxruntime(-gpu), TensorRT import (inventory.json);
#   2. rollouts on the SD 1.5 architecture (random weights: timings do not depend on their values) at
#      128 px, 100 steps, 15 frames: lftk bench torch fp32 (the parity reference), fp16 eager and
#      --compile; then the stock diffusers pipeline on the same sizes (diffusers-rollout.json);
#   3. ~20 training steps each of recipes/stage2.yaml (LoRA, fp16) and recipes/stage2-24gb.yaml (full
#      UNet, AdamW8bit, checkpointing) through lftk's engine at 128 px: samples/s and peak memory
#      beside the --dry-run estimate (train-*.json; where DeepSpeed or bitsandbytes does not import,
#      the closest plain-torch loop, and the JSON says which was missing);
#   4. `pytest -m gpu`.
#
# Here, first: bash bench/gpu_wheels.sh (the packages that machine lacks, into .whl/).
# Then the device tool: run(command="bash bench/gpu.sh", carry=[".whl"]), about 5 to 8 minutes on
# an H100. Commit the printed table under bench/results/ with the device name and date.
#
# Settings (environment): PRESET=sd15 STEPS=100 FRAMES=15 RES=128 REPEATS=2 COMPILE=1 DIFFUSERS=1
# TRAIN=1 TRAIN_STEPS=20 TRAIN_OVERRIDES="" TESTS=1.
# Elsewhere (a CPU) it runs as a rehearsal with tiny settings (tests/test_bench.py runs exactly this):
#   PRESET=tiny STEPS=1 FRAMES=2 RES=64 REPEATS=1 COMPILE=0 TRAIN_STEPS=3 TESTS=0 \
#   TRAIN_OVERRIDES="train.precision=fp32 train.optimizer=adamw train.resolution=64" OUT=/tmp/gpu-smoke bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${PRESET:-sd15} STEPS=${STEPS:-100} FRAMES=${FRAMES:-15} RES=${RES:-128} REPEATS=${REPEATS:-2} COMPILE=${COMPILE:-1}
DIFFUSERS=${DIFFUSERS:-1} TRAIN=${TRAIN:-1} TRAIN_STEPS=${TRAIN_STEPS:-20} TRAIN_OVERRIDES=${TRAIN_OVERRIDES:-} TESTS=${TESTS:-1}
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
    # One at a time: a wheel that does not install here (bitsandbytes on another CUDA) costs only itself;
    # the inventory then says what imports and the training step says what it measured instead.
    for whl in .whl/*.whl; do
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$whl" \
            || echo "could not install $(basename "$whl")" >&2
    done
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$site" .
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
lftk() { "$PY" -c 'from lftk.cli import main; main()' "$@"; }

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi: not a GPU machine"
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
    lftk doctor
    "$PY" bench/gpu_inventory.py --json "$OUT/inventory.json"
} 2>&1 | tee "$OUT/machine.txt"

base="$WORK/$PRESET"
fit=()
[ "$PRESET" = sd15 ] || fit=(--vae-steps 0)  # random weights everywhere: timings and memory do not depend on them
[ -f "$base/model_index.json" ] || lftk init-base "$base" --preset "$PRESET" "${fit[@]}" 2>&1 | tail -n 2
compile=()
[ "$COMPILE" = 1 ] && compile=(--compile)
name="bench-${PRESET}-${RES}px-${STEPS}steps"
lftk bench --model "$base" --backends torch "${compile[@]}" --resolution "$RES" --steps "$STEPS" --frames "$FRAMES" \
    --repeats "$REPEATS" --json "$OUT/$name.json" --log "$OUT/bench_log.jsonl" 2>&1 | tee "$OUT/$name.txt"

if [ "$DIFFUSERS" = 1 ]; then
    "$PY" bench/diffusers_rollout.py --model "$base" --resolution "$RES" --steps "$STEPS" --frames "$FRAMES" \
        --repeats "$REPEATS" --json "$OUT/diffusers-rollout.json" > "$OUT/diffusers-rollout.txt" 2>&1 \
        || echo "diffusers rollout failed (the rest still runs): see diffusers-rollout.txt" >&2
    tail -n 3 "$OUT/diffusers-rollout.txt"
fi

if [ "$TRAIN" = 1 ]; then
    read -r -a extra <<< "$TRAIN_OVERRIDES"
    for recipe in stage2 stage2-24gb; do
        "$PY" bench/train_steps.py "recipes/$recipe.yaml" "${extra[@]}" --base "$base" --steps "$TRAIN_STEPS" \
            --work "$WORK/train" --json "$OUT/train-$recipe.json" > "$OUT/train-$recipe.txt" 2>&1 \
            || echo "training steps of $recipe failed (the rest still runs): see train-$recipe.txt" >&2
        tail -n 3 "$OUT/train-$recipe.txt"
    done
fi

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
