#!/usr/bin/env bash
# Fetch, here, the wheels lftk needs that the lent GPU machine's image lacks (it has CUDA torch,
# transformers, peft, accelerate, typer, rich, pyyaml, safetensors, onnx, onnxruntime (CPU), pytest;
# see /work/.library/device/README.md). They go to .whl/ (git-ignored through .git/info/exclude),
# which bench/gpu.sh installs there. Python 3.12, x86-64, as on that machine.
#
#   bash bench/gpu_wheels.sh            # then: device run "bash bench/gpu.sh" with carry [".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
mkdir -p .whl
# diffusers: the pipeline; open_clip_torch: only for its CLIP BPE vocabulary (lftk never imports it);
# pydantic and its three: lftk's recipe schema.
WHEELS=(
    diffusers==0.42.1 open_clip_torch==3.3.0
    pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
du -sh .whl
ls .whl
