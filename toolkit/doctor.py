"""`lftk doctor`: what this machine has, and what it can run."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import platform
import shutil


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _tensorrt() -> tuple[str | None, str | None]:
    """(version, why it does not load). pip wheels are named tensorrt, tensorrt-cu12, tensorrt-cu13 ...,
    and JetPack ships it as a Debian package with no pip metadata at all, so ask the module itself."""
    if importlib.util.find_spec("tensorrt") is None:
        return None, None
    try:
        import tensorrt

        return str(tensorrt.__version__), None
    except Exception as exc:  # a wheel without its CUDA libraries fails on import: say so, not "absent"
        return None, f"installed but does not load ({type(exc).__name__}: {exc})"


def _line(name: str, value: str) -> str:
    return f"  {name:<16} {value}"


def facts() -> dict:
    import torch

    f: dict = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": [],
    }
    if f["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            f["gpus"].append({"name": p.name, "mem_gb": round(p.total_memory / 2**30, 1), "cc": f"{p.major}.{p.minor}"})
    for dist in ("diffusers", "transformers", "deepspeed", "peft", "bitsandbytes", "onnx", "pybullet"):
        f[dist] = _version(dist)
    f["onnxruntime"] = _version("onnxruntime") or _version("onnxruntime-gpu")
    if f["onnxruntime"] and importlib.util.find_spec("onnxruntime"):
        import onnxruntime as ort

        f["ort_providers"] = ort.get_available_providers()
    f["tensorrt"], f["tensorrt_error"] = _tensorrt()
    f["g++"] = shutil.which("g++")
    return f


def report() -> str:
    f = facts()
    gpu = ", ".join(f"{g['name']} ({g['mem_gb']} GB, sm {g['cc']})" for g in f["gpus"]) or "none: this is a CPU machine"
    lines = [
        "lftk doctor",
        _line("python", f["python"]),
        _line("platform", f["platform"]),
        _line("torch", f"{f['torch']} (CUDA build: {f['cuda_build'] or 'no, CPU-only wheel'})"),
        _line("GPU", gpu),
    ]
    for dist in ("diffusers", "transformers", "deepspeed", "peft", "bitsandbytes", "onnx", "onnxruntime", "tensorrt", "pybullet"):
        lines.append(_line(dist, f[dist] or (f["tensorrt_error"] if dist == "tensorrt" else None) or "not installed"))
    if f.get("ort_providers"):
        lines.append(_line("ort providers", ", ".join(f["ort_providers"])))
    lines.append(_line("g++ (DS ops)", f["g++"] or "missing: DeepSpeed cannot JIT-build its CPU ops"))
    can = []
    if f["deepspeed"]:
        can.append("train on " + ("GPU (NCCL)" if f["gpus"] else "CPU (gloo): demo/tiny recipes only, SD 1.5 recipes need a GPU"))
    else:
        can.append("train: no (pip install 'lftk[train]')")
    can.append("export ONNX fp32: " + ("yes" if f["onnx"] else "no (pip install 'lftk[export]')"))
    can.append("TensorRT engines: " + ("yes" if f["tensorrt"] and f["gpus"] else "no (needs a GPU and TensorRT)"))
    can.append("infer: torch" + (", ort" if f["onnxruntime"] else "") + (", trt" if f["tensorrt"] and f["gpus"] else ""))
    lines.append("can run:")
    lines += [f"  - {c}" for c in can]
    return "\n".join(lines)
