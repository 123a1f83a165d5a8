"""Every TensorRT name lftk calls exists in the bindings of both supported TensorRT lines (10.13, which
JetPack 6 and most servers run, and 11.4), read from their wheels (tests/data, bench/trt_names.sh):
a name TensorRT drops (as 11 dropped BuilderFlag.FP16) fails here, not on a user's GPU."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = (ROOT / "export" / "tensorrt.py", ROOT / "toolkit" / "runtime" / "trt_engine.py")  # builder, executor
VERSIONS = ("10.13.3", "11.4.0")

# What lftk calls on TensorRT objects (builder, network, parser, config, profile, timing cache, runtime,
# engine, context). Each must appear in the builder or the executor, so the list cannot drift from the code.
METHODS = (
    "create_network", "parse_from_file", "get_error", "num_errors", "create_builder_config", "set_memory_pool_limit",
    "create_optimization_profile", "set_shape", "add_optimization_profile", "create_timing_cache", "set_timing_cache",
    "build_serialized_network", "get_timing_cache", "serialize", "deserialize_cuda_engine", "create_execution_context",
    "get_tensor_name", "num_io_tensors", "get_tensor_mode", "get_tensor_dtype", "set_input_shape", "set_tensor_address",
    "get_tensor_shape", "execute_async_v3", "set_device_memory", "device_memory_size_v2",
)
# Used only behind hasattr/getattr, for TensorRT releases older than both lines: allowed to be missing.
GUARDED = {"device_memory", "device_memory_size", "STRONGLY_TYPED"}


def _names(version: str) -> set[str]:
    lines = (ROOT / "tests" / "data" / f"tensorrt-{version}-names.txt").read_text().splitlines()
    return {x for x in lines if x and not x.startswith("#")}


def _known(name: str, names: set[str]) -> bool:
    """In the bindings: as a string of its own, or as the tail of a longer one (the linker shares it)."""
    return name in names or any(n.endswith(name) for n in names)


def _trt_chains(tree: ast.AST) -> set[str]:
    """Every `trt.A` and `trt.A.B` in the module."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            parts, cur = [], node
            while isinstance(cur, ast.Attribute):
                parts.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id == "trt":
                out.add(".".join(reversed(parts)))
    return out


@pytest.mark.parametrize("version", VERSIONS)
def test_every_tensorrt_name_lftk_uses_is_in_the_bindings(version):
    names = _names(version)
    assert len(names) > 1000, "the names file looks empty: regenerate it with bench/trt_names.sh"
    text = "\n".join(src.read_text() for src in SOURCES)
    used = {part for chain in _trt_chains(ast.parse(text)) for part in chain.split(".") if part != "__version__"}
    for method in METHODS:
        assert re.search(rf"\.{method}\b", text), f"{method} is listed but neither TensorRT module uses it"
    missing = sorted(n for n in used | set(METHODS) if n not in GUARDED and not _known(n, names))
    assert not missing, f"not in the TensorRT {version} bindings: {missing}"


def test_the_names_files_tell_the_two_lines_apart():
    """The check can fail: 10.13 still has BuilderFlag's FP16 entry, which 11.4 dropped."""
    assert "FP16" in _names("10.13.3") and "FP16" not in _names("11.4.0")
