"""Backends: the four network calls of InstructPix2Pix (text encoder, VAE encoder, UNet, VAE
decoder), answered by torch, onnxruntime or TensorRT; `open_backend` is the one factory that picks
and opens one for a model dir (`lftk eval --backend`, infer and serve).

Backends differ only in how the networks are called; everything else (tokenizer, scheduler,
guidance, keep rules, rollouts) is the runner's (`lftk.runtime.runner`), shared by all. Each backend
also names the pipeline dir its tokenizer and scheduler config come from, its resolution and VAE
scaling factor, and keeps per-network call timings (timing.json, `lftk bench`).

Tensors go in as torch tensors (float32; token ids int64). The torch backend runs the contract's
modules (`lftk.runtime.contract`) on its device; the ort backend binds inputs and outputs to
buffers onnxruntime preallocates per shape (IO binding) and hands back a copy; the TensorRT backend
keeps everything on the GPU: one CUDA stream for the four engines, one shared scratch pool, and a
CUDA graph replaying the UNet step.
"""

from __future__ import annotations

import abc
import logging
import time
from pathlib import Path
from typing import Sequence

import torch

from lftk.errors import LftkError, NotAvailableError
from lftk.runtime.contract import COMPONENTS
from lftk.runtime.manifest import PIPELINE_DIR, component_files, rebuild_hint, verify_manifest
from lftk.runtime.ort_graph import DEFAULT_PROVIDERS, OrtGraph

log = logging.getLogger(__name__)


class Backend(abc.ABC):
    """Four timed calls around four abstract ones; subclasses set the attributes in __init__."""

    name: str
    pipeline_dir: Path  # tokenizer/, scheduler/, lftk_model.json
    resolution: int
    scaling_factor: float

    def __init__(self):
        self.stats: dict[str, list] = {c: [0, 0.0] for c in COMPONENTS}  # component -> [calls, seconds]

    @property
    @abc.abstractmethod
    def providers(self) -> list[str]:
        """Where the networks really run (for ORT: what the sessions report, not what was asked)."""

    @abc.abstractmethod
    def _call(self, component: str, *tensors: torch.Tensor) -> torch.Tensor:
        """Run one network on host tensors, positional in its contract's input order."""

    def _timed(self, component: str, *tensors: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self._call(component, *tensors)
        rec = self.stats[component]
        rec[0] += 1
        rec[1] += time.perf_counter() - t0
        return out

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(N, 77) int64 -> (N, 77, D)."""
        return self._timed("text_encoder", input_ids)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 4, h, w) unscaled latent mean."""
        return self._timed("vae_encoder", image)

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, 8, h, w), (B,) float32, (B, 77, D) -> (B, 4, h, w)."""
        return self._timed("unet", sample, timestep, embeddings)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, 4, h, w) unscaled latent -> (B, 3, H, W)."""
        return self._timed("vae_decoder", latent)

    def reset_stats(self) -> None:
        for rec in self.stats.values():
            rec[0], rec[1] = 0, 0.0

    def ms_per_call(self, component: str) -> float | None:
        calls, seconds = self.stats[component]
        return 1000.0 * seconds / calls if calls else None


TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchBackend(Backend):
    """The diffusers modules of a pipeline dir, called through the same wrappers that get exported.

    `device`: cuda when there is a GPU, else cpu. `precision`: fp32 (the reference), or fp16/bf16 weights
    and activations (fp16 only on CUDA: CPU kernels for it are slow or missing). `compile`: the fast
    path where TensorRT is not installed: UNet and VAE in channels-last memory, torch.compile'd
    (inductor; on CUDA mode "reduce-overhead", which replays each batch shape as a CUDA graph);
    attention is PyTorch's fused scaled_dot_product_attention either way (diffusers' default processor).
    Tensors stay on the device between calls: the sampler's arithmetic runs where the networks do.
    """

    name = "torch"

    def __init__(
        self,
        pipeline_dir: Path,
        resolution: int | None = None,
        device: str | None = None,
        precision: str = "fp32",
        compile: bool = False,
    ):
        from lftk.runtime.contract import build_contracts
        from lftk.runtime.resolution import pick_resolution
        from lftk.model.base import load_pipeline

        super().__init__()
        if precision not in TORCH_DTYPES:
            raise LftkError(f"unknown torch precision '{precision}': choose one of {', '.join(TORCH_DTYPES)}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise NotAvailableError("device cuda asked for, but this torch sees no CUDA GPU")
        if precision == "fp16" and self.device.type != "cuda":
            raise NotAvailableError("torch fp16 runs on a CUDA GPU; on CPU use fp32 (or bf16)")
        self.precision, self.compiled = precision, bool(compile)
        self.dtype = TORCH_DTYPES[precision]
        self.pipeline_dir = Path(pipeline_dir)
        pipe = load_pipeline(self.pipeline_dir)
        self.resolution = pick_resolution(self.pipeline_dir, pipe, resolution)
        self.scaling_factor = float(pipe.vae.config.scaling_factor)
        contracts = build_contracts(pipe, self.resolution)
        self.modules = {}
        for name, contract in contracts.items():
            module = contract.module(pipe).to(self.device, self.dtype).eval()
            if compile and name != "text_encoder":  # the text encoder runs once per instruction
                module = _compiled(module, self.device)
            self.modules[name] = module
        self.pipeline = pipe  # tokenizer and scheduler ride along; tests compare against it

    @property
    def providers(self) -> list[str]:
        where = f"{self.device}" if self.device.type == "cuda" else f"cpu({torch.get_num_threads()} threads)"
        extra = ", compiled" if self.compiled else ""
        return [f"torch:{where} {self.precision}{extra}"]

    def _call(self, component, *tensors):
        args = [t.to(self.device, self.dtype if t.is_floating_point() else t.dtype, non_blocking=True) for t in tensors]
        with torch.inference_mode():
            out = self.modules[component](*args).float()
        if self.device.type == "cuda":
            out = out.clone() if self.compiled else out  # CUDA-graph outputs are overwritten by the next replay
            torch.cuda.synchronize()  # honest per-call timings; the loop itself stays on the GPU
        return out


def _compiled(module, device: torch.device):
    module = module.to(memory_format=torch.channels_last)
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    return torch.compile(module, mode=mode, dynamic=False, fullgraph=False)


class _ExportBackend(Backend):
    """What every backend over an export dir reads from its verified manifest."""

    def _adopt(self, manifest: dict) -> None:
        self.manifest = manifest
        self.pipeline_dir = self.export_dir / manifest.get("pipeline", PIPELINE_DIR)
        self.resolution = int(manifest["resolution"])
        self.scaling_factor = float(manifest["scaling_factor"])
        self.graphs = {}


class OrtBackend(_ExportBackend):
    """onnxruntime sessions over an export dir whose manifest checks out; refuses anything else."""

    name = "ort"

    def __init__(
        self,
        export_dir: Path,
        providers: Sequence[str] | None = None,
        threads: int = 0,
        precision: str = "fp32",
        manifest: dict | None = None,
    ):
        """`precision`: which ONNX graphs to load (fp32, or a variant the export has: fp16, int8).
        `manifest`: one `verify_manifest` already returned for this dir (saves re-hashing the graphs)."""
        super().__init__()
        self.export_dir = Path(export_dir)
        manifest = manifest if manifest is not None else verify_manifest(self.export_dir)
        missing = [c for c in COMPONENTS if c not in manifest.get("components", {})]
        if missing:
            raise LftkError(
                f"{self.export_dir}: manifest lacks {', '.join(missing)}; {rebuild_hint(self.export_dir, manifest)}"
            )
        self.precision = _onnx_precision(self.export_dir, manifest, precision)
        self._adopt(manifest)
        for name in COMPONENTS:
            comp = manifest["components"][name]
            dtypes = {t["name"]: t["dtype"] for t in comp["inputs"]}
            path = self.export_dir / component_files(manifest, name, self.precision)[0]["path"]
            self.graphs[name] = OrtGraph(
                path, dtypes, comp["outputs"][0]["name"], providers or DEFAULT_PROVIDERS, threads, io_binding=True
            )
        log.info("ort backend on %s (%s): %s", self.export_dir, self.precision, ", ".join(self.providers))

    @property
    def providers(self) -> list[str]:
        return self.graphs["unet"].providers

    def _call(self, component, *tensors):
        # The graph writes into its preallocated buffer; the caller gets its own copy (a device-side
        # copy on GPU), since the runner keeps some outputs across calls (text embeddings, image latents,
        # a multistep scheduler's past predictions).
        return self.graphs[component](*tensors).clone()


class TrtBackend(_ExportBackend):
    """TensorRT engines of an export dir, refused unless built for this TensorRT and GPU from the
    graphs the manifest lists now (`check_engines`). Needs a CUDA GPU and the tensorrt package.

    The four engines share one CUDA stream and one scratch-memory pool (sized for the largest: they
    never run at once), return device tensors (the sampler's loop stays on the GPU), and with
    `cuda_graphs` the UNet replays a CUDA graph per batch shape."""

    name = "trt"

    def __init__(self, export_dir: Path, precision: str = "fp16", manifest: dict | None = None, cuda_graphs: bool = True):
        from lftk.runtime.manifest import check_engines
        from lftk.runtime.trt_engine import TrtEngine, require_tensorrt

        super().__init__()
        info = require_tensorrt()
        self.export_dir = Path(export_dir)
        manifest = manifest if manifest is not None else verify_manifest(self.export_dir)
        self.precision = precision
        engines = check_engines(self.export_dir, manifest, precision, info["tensorrt"], info["compute_capability"])
        self._adopt(manifest)
        self.stream = torch.cuda.Stream()
        for name in COMPONENTS:
            comp = manifest["components"][name]
            path = self.export_dir / engines["components"][name]["files"][0]["path"]
            self.graphs[name] = TrtEngine(
                path, [t["name"] for t in comp["inputs"]], comp["outputs"][0]["name"], stream=self.stream,
                shared_memory=True, host_output=False, cuda_graph=cuda_graphs and name == "unet",
            )
        size = max(g.memory_size for g in self.graphs.values())
        self.pool = torch.empty(max(size, 1), dtype=torch.uint8, device="cuda")
        for graph in self.graphs.values():
            graph.use_memory(self.pool)
        log.info(
            "trt backend on %s (%s): %s; shared scratch %.0f MB", self.export_dir, precision, ", ".join(self.providers), size / 2**20
        )

    @property
    def providers(self) -> list[str]:
        return self.graphs["unet"].providers

    def _call(self, component, *tensors):
        out = self.graphs[component](*tensors)
        torch.cuda.synchronize()  # honest per-call timings (stats); the data itself never leaves the GPU
        return out


def _onnx_precision(export_dir: Path, manifest: dict, precision: str) -> str:
    """`precision` if the export holds its ONNX graphs; LftkError naming what it holds otherwise
    (component_files alone would fall back to fp32 without a word)."""
    from lftk.runtime.precision import Format, Precision, targets_in

    wanted = Precision.parse(precision).value
    held = [t.precision.value for t in targets_in(manifest) if t.format == Format.ONNX]
    if wanted not in held:
        raise LftkError(
            f"{export_dir}: no {wanted} ONNX graphs (this export holds {', '.join(held) or 'none'}); add them with: "
            f"lftk export {export_dir} --no-onnx --precision {wanted} --out {export_dir}"
        )
    return wanted


BACKENDS = ("torch", "ort", "trt")


def open_backend(
    model: str | Path,
    backend: str = "ort",
    providers: Sequence[str] | None = None,
    precision: str | None = None,
    compile: bool = False,
    threads: int = 0,
    resolution: int | None = None,
    manifest: dict | None = None,
) -> Backend:
    """The backend for MODEL, the one factory infer, serve, eval and bench open backends with.

    ORT and TensorRT need an export dir; torch takes any model (an export's pipeline/ copy).
    `precision`: ONNX graphs for ort (default fp32), engines for trt (default fp16), torch weights
    (fp32, fp16 on CUDA, bf16). `compile`: torch.compile the torch backend. `threads`: onnxruntime's
    intra-op threads (0: its own choice). `resolution`: the torch backend's frame size (default: the
    trained one; an export's is fixed by its manifest). `manifest`: one `verify_manifest` already
    returned for this export (saves hashing the graphs again).

    What this machine or this model dir lacks for the backend (a GPU, TensorRT, an export, the
    pipeline copy) raises NotAvailableError, a LftkError naming the fix."""
    if backend not in BACKENDS:
        raise LftkError(f"unknown backend '{backend}': choose one of {', '.join(BACKENDS)}")
    if compile and backend != "torch":
        raise LftkError(f"--compile is for --backend torch (the {backend} backend runs prebuilt graphs)")
    from lftk.model.resolve import resolve_model
    from lftk.runtime.trt_engine import require_tensorrt

    if backend == "trt":
        require_tensorrt()  # before the model is even looked at: the reason here is the machine
    ref = resolve_model(model)
    if backend in ("ort", "trt"):
        if ref.kind != "export":
            raise NotAvailableError(
                f"{model} is a {ref.kind} dir; the {backend} backend runs exported graphs: run "
                f"`lftk export {model} --onnx --out EXPORT_DIR` first, then pass --model EXPORT_DIR"
            )
        if backend == "trt":
            return TrtBackend(ref.path, precision or "fp16", manifest=manifest)
        return OrtBackend(ref.path, providers, threads=threads, precision=precision or "fp32", manifest=manifest)
    if ref.pipeline_dir is None:
        raise NotAvailableError(
            f"{model}: export dir without its pipeline/ copy: the torch backend needs the diffusers weights"
        )
    return TorchBackend(ref.pipeline_dir, resolution, precision=precision or "fp32", compile=compile)
