"""What a machine offers lftk: GPU, driver, CUDA, python, torch, and which packages import (with versions).

    python bench/gpu_inventory.py --json OUT.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import subprocess
import sys
from pathlib import Path

PACKAGES = ("torch", "deepspeed", "bitsandbytes", "diffusers", "peft", "transformers", "onnx", "onnxruntime", "tensorrt")


def _probe(name: str) -> dict:
    try:
        mod = importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - any failure to import is the answer
        return {"importable": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
    info = {"importable": True, "version": getattr(mod, "__version__", None)}
    if name == "onnxruntime":
        info["providers"] = mod.get_available_providers()  # CUDAExecutionProvider: the onnxruntime-gpu build
    return info


def inventory() -> dict:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True) if _which("nvidia-smi") else None
    out = {"python": platform.python_version(), "platform": platform.platform(),
           "nvidia_smi": smi.stdout.strip() if smi and smi.returncode == 0 else None,
           "packages": {name: _probe(name) for name in PACKAGES}}
    if out["packages"]["torch"]["importable"]:
        import torch

        out["cuda"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        out["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability())) if torch.cuda.is_available() else None
    return out


def _which(cmd: str) -> bool:
    import shutil

    return shutil.which(cmd) is not None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    inv = inventory()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(inv, indent=1))
    print(f"python {inv['python']}; GPU {inv.get('gpu')}; CUDA {inv.get('cuda')}; nvidia-smi: {inv['nvidia_smi']}")
    for name, info in inv["packages"].items():
        print(f"  {name:<13} {info.get('version') or '-':<14} {'ok' if info['importable'] else 'no: ' + info['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
