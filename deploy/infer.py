"""`lftk infer`: one frame + an instruction -> a rollout of future frames on disk, with timings.

OUT/frame_000.png is the input (at the model's resolution), frame_001.png ... the predictions in
order, OUT/rollout.gif all of them, OUT/timing.json what ran where and how fast.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from lftk.data.images import load_rgb, save_rgb
from lftk.deploy.backends import BACKENDS, Backend, OrtBackend, TorchBackend, TrtBackend
from lftk.deploy.runner import Runner
from lftk.errors import LftkError
from lftk.export.contract import CFG_BRANCHES
from lftk.export.sampling import uses_cfg
from lftk.export.tensorrt import require_tensorrt
from lftk.model.resolve import resolve_model

log = logging.getLogger(__name__)

MODES = ("rollout", "sweep")
GIF_MS_PER_FRAME = 250


def open_backend(
    model: str | Path, backend: str = "ort", providers: Sequence[str] | None = None, precision: str | None = None
) -> Backend:
    """The backend for MODEL: ORT and TensorRT need an export dir; torch takes any model (an export's
    pipeline/ copy). `precision`: ONNX graphs for ort (default fp32), engines for trt (default fp16)."""
    if backend not in BACKENDS:
        raise LftkError(f"unknown backend '{backend}': choose one of {', '.join(BACKENDS)}")
    if backend == "torch" and precision not in (None, "fp32"):
        raise LftkError(f"the torch backend runs the fp32 weights; --precision {precision} is for --backend ort or trt")
    if backend == "trt":
        require_tensorrt()  # before the model is even looked at: the reason here is the machine
    ref = resolve_model(model)
    if backend in ("ort", "trt"):
        if ref.kind != "export":
            raise LftkError(
                f"{model} is a {ref.kind} dir; the {backend} backend runs exported graphs: run "
                f"`lftk export {model} --onnx --out EXPORT_DIR` first, then pass --model EXPORT_DIR"
            )
        if backend == "trt":
            return TrtBackend(ref.path, precision or "fp16")
        return OrtBackend(ref.path, providers, precision=precision or "fp32")
    if ref.pipeline_dir is None:
        raise LftkError(f"{model}: export dir without its pipeline/ copy: the torch backend needs the diffusers weights")
    return TorchBackend(ref.pipeline_dir)


def _write_outputs(out: Path, frames: list[np.ndarray]) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("frame_*.png"):  # a shorter rerun must not leave frames of the last one behind
        stale.unlink()
    names = []
    for i, frame in enumerate(frames):
        name = f"frame_{i:03d}.png"
        save_rgb(frame, out / name)
        names.append(name)
    gif = [Image.fromarray(f) for f in frames]
    gif[0].save(out / "rollout.gif", save_all=True, append_images=gif[1:], duration=GIF_MS_PER_FRAME, loop=0)
    return names


def run_infer(
    model: str | Path,
    image: Path,
    instruction: str,
    backend: str = "ort",
    frames: int = 15,
    mode: str = "rollout",
    steps: int = 20,
    seed: int = 0,
    out: Path = Path("infer_out"),
    guidance: float = 7.5,
    image_guidance: float = 1.5,
    scheduler: str = "euler_a",
    precision: str | None = None,
) -> dict:
    """Predict `frames` future frames from IMAGE; returns (and writes to OUT/timing.json) the summary."""
    if mode not in MODES:
        raise LftkError(f"unknown mode '{mode}': choose one of {', '.join(MODES)}")
    if mode == "sweep":
        raise LftkError("sweep needs a horizon-conditioned model; not available yet (use --mode rollout)")
    if frames < 1 or steps < 1:
        raise LftkError(f"--frames and --steps must be >= 1 (got frames={frames}, steps={steps})")
    if not instruction or not instruction.strip():
        raise LftkError("--instruction is empty: say what the robot does, e.g. 'stack the blocks'")
    out = Path(out)

    t0 = time.perf_counter()
    be = open_backend(model, backend, precision=precision)
    runner = Runner.from_backend(be, scheduler)
    current = load_rgb(image, runner.resolution)
    load_s = time.perf_counter() - t0

    be.reset_stats()
    t0 = time.perf_counter()
    predicted = runner.rollout(current, instruction, frames, steps, guidance, image_guidance, seed)
    total_s = time.perf_counter() - t0

    names = _write_outputs(out, [current] + predicted)
    unet_calls = be.stats["unet"][0]
    timing = {
        "backend": be.name,
        "precision": getattr(be, "precision", "fp32"),
        "providers": be.providers,
        "mode": mode,
        "model": str(model),
        "resolution": runner.resolution,
        "steps": steps,
        "frames": frames,
        "seed": seed,
        "guidance": guidance,
        "image_guidance": image_guidance,
        "scheduler": scheduler,
        "load_seconds": round(load_s, 3),
        "total_seconds": round(total_s, 3),
        "ms_per_frame": round(1000 * total_s / frames, 2),
        "unet_calls": unet_calls,
        "unet_batch": CFG_BRANCHES if uses_cfg(guidance, image_guidance) else 1,  # x 1 frame per call
        "ms_per_unet_call": round(be.ms_per_call("unet") or 0.0, 3),
        "ms_per_call": {c: round(be.ms_per_call(c) or 0.0, 3) for c in be.stats},
    }
    (out / "timing.json").write_text(json.dumps(timing, indent=2))
    log.info(
        "%d frames (%s, %d steps) in %.2f s: %.0f ms/frame, %.1f ms per UNet call -> %s",
        frames, be.name, steps, total_s, timing["ms_per_frame"], timing["ms_per_unet_call"], out,
    )
    return {**timing, "out": str(out), "files": names + ["rollout.gif", "timing.json"]}
