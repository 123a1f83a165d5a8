"""How a bench row is timed: a single-frame rollout and one batched predict call, medians over repeats."""

from __future__ import annotations

import statistics
import time

import numpy as np

from lftk.export.parity import parity_image
from lftk.runtime.runner import Runner

INSTRUCTION = "stack the blocks"


def start_frames(resolution: int, frames: int) -> np.ndarray:
    """FRAMES different deterministic start frames, (F, H, W, 3) uint8."""
    return np.concatenate([parity_image(resolution, seed=k) for k in range(frames)])


def measure(runner: Runner, starts: np.ndarray, steps: int, warmup: int, repeats: int, seed: int):
    """Timings (medians over repeats) and the batched frames of the last repeat."""
    be, frames = runner.backend, len(starts)
    for _ in range(warmup):  # both batch shapes: ORT and TensorRT plan per shape on first sight
        runner.predict(starts[:1], INSTRUCTION, steps, seed=seed)
        runner.predict(starts, INSTRUCTION, steps, seed=seed)
    unet_ms, single_s, batched_s, batched_unet_ms = [], [], [], []
    batched = None
    for _ in range(repeats):
        be.reset_stats()
        t0 = time.perf_counter()
        runner.rollout(starts[0], INSTRUCTION, frames, steps, seed=seed)
        single_s.append(time.perf_counter() - t0)
        unet_ms.append(be.ms_per_call("unet"))
        be.reset_stats()
        t0 = time.perf_counter()
        batched = runner.predict(starts, INSTRUCTION, steps, seed=seed)  # (F, H, W, 3)
        batched_s.append(time.perf_counter() - t0)
        batched_unet_ms.append(be.ms_per_call("unet"))
    single, multi = statistics.median(single_s), statistics.median(batched_s)
    timings = {
        "ms_per_unet_step": round(statistics.median(unet_ms), 3),
        "ms_per_frame": round(1000 * single / frames, 2),
        "frames_per_s": round(frames / single, 3),
        "batched_frames_per_s": round(frames / multi, 3),
        "batched_ms_per_unet_step": round(statistics.median(batched_unet_ms), 3),
    }
    return timings, batched
