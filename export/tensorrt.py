"""TensorRT engines from the exported ONNX graphs (TensorRT 10.x and 11.x Python API, imported lazily).

Thin on purpose: parse the graph with TensorRT's ONNX parser, one optimization profile from the
contract's min/opt/max shapes, a timing cache, build, serialize. Every network is strongly typed:
the graph carries its precision and TensorRT keeps the types it is given. TensorRT 11 knows no
other mode (its BuilderFlag has no FP16 or INT8 entry, and NetworkDefinitionCreationFlag.STRONGLY_TYPED
is deprecated there and ignored); TensorRT 10 (JetPack 6) builds the same way with that flag set.
Precisions, by the graph each engine is built from (lftk.runtime.precision):
  fp16  the fp16 ONNX variant (fp16 inside, fp32 inputs and outputs);
  int8  the UNet's Q/DQ graph (explicit quantization; its unquantized layers stay fp32), and the
        fp16 variants of the text encoder and VAE (an int8 export's other engines are fp16);
  fp8   (planned) an FP8 Q/DQ graph.

Engines are content-addressed: the cache key hashes the graph's sha256, the shape
profile, the precision, the GPU's compute capability, the TensorRT version and the builder
settings, so a rebuild with the same inputs is a cache hit and any change is a new engine. The
cache lives outside the export (~/.cache/lftk/trt, or $LFTK_TRT_CACHE) next to one timing cache
per TensorRT version and GPU; the export dir gets its own copy of each engine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from lftk.errors import LftkError
from lftk.runtime.layout import TRT_DIR
from lftk.runtime.trt_engine import TrtEngine, _logger

log = logging.getLogger(__name__)

WORKSPACE_BYTES = 4 << 30  # builder scratch memory limit; engines for the SD 1.5 UNet build within it
BUILDER_SETTINGS = {"workspace": WORKSPACE_BYTES, "api": "strongly-typed"}  # part of the cache key


def cache_key(onnx_sha256: str, shapes: dict, precision: str, compute_capability: str, tensorrt_version: str) -> str:
    """Content address of an engine: everything that changes the built plan, nothing that does not."""
    record = {
        "onnx_sha256": onnx_sha256,
        "profile": {name: [list(s) for s in mmo] for name, mmo in sorted(shapes.items())},
        "precision": precision,
        "compute_capability": compute_capability,
        "tensorrt": tensorrt_version,
        "builder": BUILDER_SETTINGS,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def cache_dir() -> Path:
    root = os.environ.get("LFTK_TRT_CACHE") or Path.home() / ".cache" / "lftk" / "trt"
    return Path(root)


def timing_cache_path(info: dict) -> Path:
    return cache_dir() / f"timing-trt{info['tensorrt']}-sm{info['compute_capability'].replace('.', '')}.cache"


def network_flags(trt) -> int:
    """Strongly typed: the flag TensorRT 10 needs for it; TensorRT 11 ignores it (its only mode), and a
    release that drops the name builds strongly typed without it."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def build_engine(onnx_path: Path, shapes: dict, precision: str, timing_cache: Path) -> bytes:
    """Serialized engine for the graph at `onnx_path` with one profile ({input: (min, opt, max)})."""
    import tensorrt as trt

    logger = _logger()
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from a path: external data resolves next to it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise LftkError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise LftkError(f"TensorRT failed to build a {precision} engine from {onnx_path} (see the TensorRT log above)")
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = timing_cache.with_suffix(".tmp")
    tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    tmp.replace(timing_cache)
    return bytes(plan)


def cached_engine(onnx_path: Path, onnx_sha256: str, shapes: dict, precision: str, info: dict) -> tuple[Path, str, bool]:
    """(cache file, key, hit): the engine for these inputs from the cache, built into it if missing."""
    key = cache_key(onnx_sha256, shapes, precision, info["compute_capability"], info["tensorrt"])
    path = cache_dir() / f"{key}.engine"
    if path.is_file():
        return path, key, True
    plan = build_engine(onnx_path, shapes, precision, timing_cache_path(info))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(plan)
    tmp.replace(path)
    return path, key, False


def place(cached: Path, dest: Path) -> Path:
    """The export's own copy of a cached engine (a hard link where the filesystem allows)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    try:
        os.link(cached, dest)
    except OSError:
        shutil.copyfile(cached, dest)
    return dest


def build_engines(export_dir: Path, manifest: dict, target, info: dict, report) -> dict:
    """Engines of one export target (precision.Target) for every component; the manifest's engine record.

    Components the target does not quantize get its fallback precision (fp16), built from the graph the
    table names for them (the fp16 variant): every network is strongly typed.
    """
    from lftk.runtime.contract import profile_shapes
    from lftk.runtime.manifest import component_files, file_record, graph_sha256
    from lftk.export.stages import stage

    export_dir = Path(export_dir)
    record = {
        "tensorrt": info["tensorrt"],
        "compute_capability": info["compute_capability"],
        "gpu": info["gpu"],
        "components": {},
    }
    for name, comp in manifest["components"].items():
        precision = target.precision_of(name).value
        graph_precision = target.source_of(name)[1].value
        files = component_files(manifest, name, graph_precision)
        if graph_precision != "fp32" and files is comp["files"]:
            raise LftkError(f"{export_dir}: no {graph_precision} graph of {name} to build its {precision} engine from")
        shapes = profile_shapes(comp)
        sha = graph_sha256(files)
        with stage(report, "trt", f"{name} {precision}") as st:
            cached, key, hit = cached_engine(export_dir / files[0]["path"], sha, shapes, precision, info)
            dest = place(cached, export_dir / TRT_DIR / target.filename(name))
            st.done(dest, ("cache hit " if hit else "built, cached as ") + key[:12])
        record["components"][name] = {
            "files": [file_record(export_dir, dest.relative_to(export_dir).as_posix())],
            "precision": precision,
            "onnx": files[0]["path"],
            "graph_precision": graph_precision,
            "onnx_sha256": sha,
            "cache_key": key,
            "profile": {n: [list(s) for s in mmo] for n, mmo in shapes.items()},
        }
    return record


TRT_FRAME_PSNR_MIN_DB = {"fp16": 30.0, "int8": 25.0}  # vs onnxruntime (fp32; int8 UNet for int8)


def engine_parity(pipe, export_dir: Path, manifest: dict, record: dict, precision: str, resolution: int) -> dict:
    """One frame over the engines against the same frame over onnxruntime (the graphs they came from
    at fp32, with the int8 UNet for an int8 build): PSNR, and max abs diff per component at opt shapes."""
    from lftk.runtime.contract import profile_shapes
    from lftk.runtime.ort_graph import OrtGraph
    from lftk.export.parity import ComponentNetworks, parity_image, sample_frame
    from lftk.eval.metrics import psnr_db

    export_dir = Path(export_dir)
    engines, graphs, diffs = {}, {}, {}
    for name, comp in manifest["components"].items():
        rec = record["components"][name]
        inputs = [t["name"] for t in comp["inputs"]]
        engines[name] = TrtEngine(export_dir / rec["files"][0]["path"], inputs, comp["outputs"][0]["name"])
        dtypes = {t["name"]: t["dtype"] for t in comp["inputs"]}
        graphs[name] = OrtGraph(export_dir / rec["onnx"], dtypes, comp["outputs"][0]["name"])
        gen = torch.Generator().manual_seed(0)
        feeds = []
        for t in comp["inputs"]:
            shape = profile_shapes(comp)[t["name"]][1]
            if t["dtype"] == "int64":
                feeds.append(torch.randint(0, 49407, shape, generator=gen))
            elif t["name"] == "timestep":
                feeds.append(torch.rand(shape, generator=gen) * 999)
            else:
                feeds.append(torch.randn(shape, generator=gen))
        diffs[name] = float((engines[name](*feeds) - graphs[name](*feeds)).abs().max())
    image = parity_image(resolution)
    prompt = "move the red block onto the blue block"
    ref = sample_frame(pipe, ComponentNetworks(graphs), image, prompt, 4, 0)
    got = sample_frame(pipe, ComponentNetworks(engines), image, prompt, 4, 0)
    value = round(psnr_db(ref, got), 3)
    minimum = TRT_FRAME_PSNR_MIN_DB.get(precision, 30.0)
    return {"frame_psnr_db_vs_ort": value, "min_db": minimum, "max_abs_diff": diffs, "passed": value >= minimum}
