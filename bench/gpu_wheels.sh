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
# deepspeed's dependencies and bitsandbytes (43 MB, CUDA kernels inside): lftk's training engine and
# its 8-bit optimizers. deepspeed itself is an sdist on PyPI: built here into a pure-python wheel below.
WHEELS=(
    diffusers==0.42.1 open_clip_torch==3.3.0
    pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
    hjson==3.1.0 py-cpuinfo==9.0.0 msgpack==1.1.2 ninja==1.13.0 nvidia-ml-py==13.580.82 einops==0.8.1
    bitsandbytes==0.50.2
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
# DS_BUILD_OPS=0: no CUDA ops compiled ahead (DeepSpeed builds what it needs at run time, or lftk's
# training runs without them); the result is py3-none-any, so a Python 3.11 machine can build it.
if ! ls .whl/deepspeed-*.whl >/dev/null 2>&1; then
    python3 -m pip download -q --no-deps --no-binary=:all: deepspeed==0.19.8 -d .whl/src
    DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation .whl/src/deepspeed-0.19.8.tar.gz -w .whl
    rm -rf .whl/src
fi
du -sh .whl  # the device tool carries at most 64 MiB
ls .whl
