"""TensorRT engines from the exported ONNX graphs (TensorRT 10.x and 11.x Python API, imported lazily).

Thin on purpose: parse the graph with TensorRT's ONNX parser, one optimization profile from the
contract's min/opt/max shapes, a timing cache, build, serialize. Every network is strongly typed:
the graph carries its precision and TensorRT keeps the types it is given. TensorRT 11 knows no
other mode (its BuilderFlag has no FP16 or INT8 entry, and NetworkDefinitionCreationFlag.STRONGLY_TYPED
is deprecated there and ignored); TensorRT 10 (JetPack 6) builds the same way with that flag set.
Precisions, by the graph each engine is built from (lftk.export.precision):
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

from lftk.errors import LftkError, NotAvailableError

log = logging.getLogger(__name__)

WORKSPACE_BYTES = 4 << 30  # builder scratch memory limit; engines for the SD 1.5 UNet build within it
BUILDER_SETTINGS = {"workspace": WORKSPACE_BYTES, "api": "strongly-typed"}  # part of the cache key


def machine() -> dict:
    """What this machine offers for TensorRT: versions, GPU, compute capability, and what is missing."""
    info: dict = {"tensorrt": None, "cuda": torch.cuda.is_available(), "gpu": None, "compute_capability": None, "missing": []}
    try:
        import tensorrt as trt

        info["tensorrt"] = trt.__version__
    except ImportError:
        info["missing"].append(
            "the TensorRT Python package (pip install tensorrt; its wheels come from NVIDIA's index, pypi.nvidia.com)"
        )
    if info["cuda"]:
        major, minor = torch.cuda.get_device_capability()
        info["compute_capability"] = f"{major}.{minor}"
        info["gpu"] = torch.cuda.get_device_name()
    else:
        info["missing"].insert(0, "a CUDA GPU (torch.cuda.is_available() is False)")
    return info


def require_tensorrt() -> dict:
    """machine(), or NotAvailableError naming everything that is missing."""
    info = machine()
    if info["missing"]:
        raise NotAvailableError(
            "TensorRT engines need " + " and ".join(info["missing"])
            + "; export ONNX here (lftk export MODEL --onnx) and build engines on the target GPU with --trt"
        )
    return info


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


def _logger():
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


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


_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool}


class TrtEngine:
    """One engine, called with torch tensors like OrtGraph (inputs in contract order, one output).

    Buffers are torch CUDA tensors; execution is `execute_async_v3` on a CUDA stream (TensorRT warns
    that the legacy default stream costs extra synchronisation). Defaults suit a one-off check (the
    export's engine parity): a stream of its own, TensorRT's own scratch memory, the output copied to
    the host. The runtime backend asks for more (`TrtBackend`):

    - `stream`: one stream shared by all four engines, so they run in order without host syncs;
    - `shared_memory`: the context gets no scratch memory of its own; `use_memory` hands it a slice of
      one pool sized for the largest engine (the four never run at the same time);
    - `host_output=False`: the output stays on the GPU (float32, a fresh tensor), so the denoising loop
      never goes through the host;
    - `cuda_graph`: each input-shape combination is captured once as a CUDA graph over static
      input/output buffers and replayed (one launch per UNet call instead of one per kernel).
    """

    def __init__(
        self,
        path: Path,
        input_names: list[str],
        output_name: str,
        stream: "torch.cuda.Stream | None" = None,
        shared_memory: bool = False,
        host_output: bool = True,
        cuda_graph: bool = False,
    ):
        import tensorrt as trt

        self.path = Path(path)
        self._runtime = trt.Runtime(_logger())
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise LftkError(f"{path}: TensorRT could not load this engine (built by another TensorRT or for another GPU?)")
        if shared_memory:
            strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
            self.context = self.engine.create_execution_context(strategy)
        else:
            self.context = self.engine.create_execution_context()
        self.stream = stream or torch.cuda.Stream()
        self.host_output, self.cuda_graph = host_output, cuda_graph
        self._graphs: dict[tuple, tuple] = {}  # input shapes -> (CUDAGraph, static inputs, static output)
        self.input_names, self.output_name = list(input_names), output_name
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if sorted(inputs) != sorted(self.input_names) or output_name not in names:
            raise LftkError(f"{path}: engine tensors {names} differ from the contract {self.input_names} -> {output_name}")

    @property
    def memory_size(self) -> int:
        """Scratch bytes the engine needs at its largest profile shapes."""
        eng = self.engine
        return int(eng.device_memory_size_v2 if hasattr(eng, "device_memory_size_v2") else eng.device_memory_size)

    def use_memory(self, pool: torch.Tensor) -> None:
        """Run in (the start of) `pool`, a CUDA uint8 tensor of at least `memory_size` bytes."""
        if pool.numel() < self.memory_size:
            raise LftkError(f"{self.path}: needs {self.memory_size} bytes of scratch memory, the pool has {pool.numel()}")
        if hasattr(self.context, "set_device_memory"):  # TensorRT >= 10.1
            self.context.set_device_memory(pool.data_ptr(), pool.numel())
        else:
            self.context.device_memory = pool.data_ptr()

    @property
    def providers(self) -> list[str]:
        return [f"TensorRT:{torch.cuda.get_device_name()}"]

    def _dtype(self, name: str) -> torch.dtype:
        return _TORCH_DTYPES[self.engine.get_tensor_dtype(name).name]

    def _bind(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """Set shapes and addresses for these device inputs; a new output tensor, bound."""
        for name, t in zip(self.input_names, inputs):
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        shape = tuple(self.context.get_tensor_shape(self.output_name))
        out = torch.empty(shape, dtype=self._dtype(self.output_name), device="cuda")
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        return out

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise LftkError(f"{self.path}: TensorRT execution failed")

    def _replay(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        key = tuple(tuple(t.shape) for t in inputs)
        if key not in self._graphs:
            static = [t.clone() for t in inputs]
            out = self._bind(static)
            self._execute()  # TensorRT must run once at new shapes before a capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                self._execute()
            self._graphs[key] = (graph, static, out)
        graph, static, out = self._graphs[key]
        for dst, src in zip(static, inputs):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        return out

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        caller = torch.cuda.current_stream()  # where the inputs were made and the output will be used
        self.stream.wait_stream(caller)  # the caller's last kernels (the scheduler step) may still be writing them
        with torch.cuda.stream(self.stream):
            inputs = [t.to("cuda", self._dtype(n), non_blocking=True).contiguous() for n, t in zip(self.input_names, tensors)]
            if self.cuda_graph:
                static = self._replay(inputs)  # overwritten by the next replay: hand out a copy
                out = static.clone() if static.dtype == torch.float32 else static.float()
            else:
                out = self._bind(inputs)
                self._execute()
                out = out.float()
            if self.host_output:
                out = out.cpu()  # on this stream: waits for the engine
            else:
                out.record_stream(caller)  # made on this stream, used on the caller's: not reused before it is done
        if self.host_output:
            self.stream.synchronize()
        else:
            caller.wait_stream(self.stream)
        return out


def build_engines(export_dir: Path, manifest: dict, target, info: dict, report) -> dict:
    """Engines of one export target (precision.Target) for every component; the manifest's engine record.

    Components the target does not quantize get its fallback precision (fp16), built from the graph the
    table names for them (the fp16 variant): every network is strongly typed.
    """
    from lftk.export.contract import profile_shapes
    from lftk.export.manifest import component_files, file_record, graph_sha256
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
            dest = place(cached, export_dir / "trt" / target.filename(name))
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
    from lftk.export.contract import profile_shapes
    from lftk.export.ort_graph import OrtGraph
    from lftk.export.parity import ComponentNetworks, parity_image, psnr, sample_frame

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
    value = round(psnr(ref, got), 3)
    minimum = TRT_FRAME_PSNR_MIN_DB.get(precision, 30.0)
    return {"frame_psnr_db_vs_ort": value, "min_db": minimum, "max_abs_diff": diffs, "passed": value >= minimum}
