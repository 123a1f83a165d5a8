#!/usr/bin/env bash
# The names a TensorRT Python bindings wheel knows, for tests/test_trt.py's API check (the bindings
# cannot be imported without TensorRT's libraries, but their enum and method names are plain strings
# in tensorrt.so). The wheels download from PyPI; the libraries they need do not.
#   bash bench/trt_names.sh 10.13.3.9.post1 11.4.0.106     # writes tests/data/tensorrt-<version>-names.txt
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for version in "$@"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 --implementation cp \
        --platform manylinux_2_28_x86_64 "tensorrt-cu12-bindings==$version" -d "$work/$version"
    (cd "$work/$version" && python3 -m zipfile -e ./*.whl x)
    short=$(echo "$version" | cut -d. -f1-3)
    out="tests/data/tensorrt-$short-names.txt"
    # Identifier-like strings only. The linker stores a name that ends another ("device_memory" in
    # "set_device_memory") once, so the test also accepts a name as the tail of a longer one.
    { echo "# strings of tensorrt.so in tensorrt-cu12-bindings $version (bench/trt_names.sh)"
      strings -n 3 "$work/$version"/x/tensorrt_bindings/tensorrt.so | grep -oE '^[A-Za-z_][A-Za-z0-9_]{2,60}$' | sort -u
    } > "$out"
    echo "$out: $(($(wc -l < "$out") - 1)) names"
done
