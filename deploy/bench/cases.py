"""Which (backend, precision) rows a bench has, how each row's backend is opened, and its size on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from lftk.errors import LftkError, NotAvailableError
from lftk.runtime.backends import BACKENDS, Backend, open_backend
from lftk.runtime.contract import COMPONENTS, MAX_FRAMES
from lftk.runtime.manifest import component_files
from lftk.runtime.precision import Format, targets_in

REFERENCE = ("torch", "fp32")  # the row every other row's frames are compared with
PEER = "diffusers"  # the stock diffusers pipeline on the same weights (lftk.deploy.bench.peer)
BENCH_BACKENDS = BACKENDS + (PEER,)
TORCH_ROWS = ("torch", "torch-compile", PEER)
NO_TARGET = "-"  # the precision of an ort or trt row whose export has no graphs or engines for it


def check_args(backends: Sequence[str], frames: int, steps: int, warmup: int, repeats: int) -> list[str]:
    """The backends asked for, in order, once each; bad counts refused."""
    backends = [b.strip() for b in backends if b.strip()]
    unknown = [b for b in backends if b not in BENCH_BACKENDS]
    if unknown or not backends:
        raise LftkError(
            f"unknown backend(s) {', '.join(unknown) or '(none given)'}: choose from {', '.join(BENCH_BACKENDS)}"
        )
    if not 1 <= frames <= MAX_FRAMES:
        raise LftkError(f"--frames must be 1..{MAX_FRAMES} (the batched rollout is one call; exports take {MAX_FRAMES} frames at most), got {frames}")
    if steps < 1 or repeats < 1 or warmup < 0:
        raise LftkError(f"steps and repeats must be >= 1 and warmup >= 0 (got steps={steps}, repeats={repeats}, warmup={warmup})")
    return list(dict.fromkeys(backends))


def cases(manifest: dict | None, backends: Sequence[str], compile: bool = False) -> list[tuple[str, str]]:
    """(backend, precision) rows, the reference first, then the diffusers peer; ort and trt get a row
    even when the export has nothing for them. torch: fp32 eager (the reference), fp16 eager on a CUDA
    machine, and with `compile` a "torch-compile" row at the precision a user would run it (fp16 on
    CUDA, fp32 on CPU). diffusers: the stock pipeline at fp32 (and fp16 on CUDA)."""
    import torch

    rows = []
    targets = targets_in(manifest) if manifest is not None else []
    cuda = torch.cuda.is_available()
    for backend in backends:
        if backend == "torch":
            rows.append(REFERENCE)
            if cuda:
                rows.append(("torch", "fp16"))
            if compile:
                rows.append(("torch-compile", "fp16" if cuda else "fp32"))
        elif backend == PEER:
            rows += [(PEER, "fp32")] + ([(PEER, "fp16")] if cuda else [])
        elif backend == "ort":
            rows += [("ort", t.precision.value) for t in targets if t.format == Format.ONNX] or [("ort", NO_TARGET)]
        else:
            rows += [("trt", t.precision.value) for t in targets if t.format == Format.TRT] or [("trt", NO_TARGET)]
    return sorted(rows, key=lambda c: (c != REFERENCE, c[0] != PEER))


def ort_providers(precision: str) -> list[str]:
    """CUDA first where onnxruntime has it; fp16 graphs only there (on CPU they are slower, not faster)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if precision == "fp16":
        raise NotAvailableError("fp16 graphs run on GPU providers; this onnxruntime has CPUExecutionProvider only")
    return ["CPUExecutionProvider"]


def open_case(model: Path, manifest: dict | None, backend: str, precision: str, threads: int, resolution: int) -> Backend:
    """The row's backend through `open_backend`; NotAvailableError when the row cannot run here.
    (The diffusers row has no backend: `lftk.deploy.bench.peer` opens it.)"""
    if backend in ("torch", "torch-compile"):
        return open_backend(model, "torch", precision=precision, compile=backend == "torch-compile", resolution=resolution)
    if precision == NO_TARGET:
        if backend == "trt":
            from lftk.runtime.trt_engine import require_tensorrt

            require_tensorrt()  # the machine's reason first: engines could not run here anyway
            raise NotAvailableError(
                f"no TensorRT engines in this export (build them here: lftk export {model} --no-onnx --trt "
                f"--precision fp16 --out {model})"
            )
        if manifest is not None:
            raise NotAvailableError(f"no ONNX graphs in this export (lftk export {model} --onnx --out EXPORT_DIR)")
    providers = ort_providers(precision) if backend == "ort" and precision != NO_TARGET else None
    return open_backend(model, backend, providers=providers, precision=precision, threads=threads, manifest=manifest)


def size_mb(model: Path, manifest: dict | None, pipeline_dir: Path | None, backend: str, precision: str) -> float | None:
    """MB of the files the row's backend loads: the diffusers weights, the ONNX graphs, or the engines."""
    if backend in TORCH_ROWS:
        if pipeline_dir is None:
            return None
        files = [p for c in COMPONENTS for p in _weights(pipeline_dir, c)]
        return round(sum(p.stat().st_size for p in files) / 1e6, 2)
    if manifest is None or precision == NO_TARGET:
        return None
    if backend == "ort":
        recs = [r for c in COMPONENTS for r in component_files(manifest, c, precision)]
    else:
        engines = manifest.get("engines", {}).get(precision, {}).get("components", {})
        recs = [f for rec in engines.values() for f in rec.get("files", [])]
        if not recs:
            return None
    return round(sum(r["bytes"] for r in recs) / 1e6, 2)


def _weights(pipeline_dir: Path, component: str) -> list[Path]:
    sub = {"text_encoder": "text_encoder", "vae_encoder": "vae", "vae_decoder": "vae", "unet": "unet"}[component]
    if component == "vae_decoder":  # one vae/ dir holds both halves: count it once
        return []
    return [p for p in (pipeline_dir / sub).glob("*") if p.suffix in (".safetensors", ".bin")]
