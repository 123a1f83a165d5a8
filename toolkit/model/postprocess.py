"""Optional post-processing of predicted frames: the paper's "colour and sharpening" step.

Diffusion predictions of a whole scene drift in colour (a slight cast, washed-out contrast) and come
out soft, more so along a rollout where each prediction is fed back in. Two cheap fixes, off by
default, each measured by `lftk eval --postprocess` beside the raw model (README: "Post-processing"):

  color    match each channel's mean and spread to the current (input) frame's: the camera, light
           and most of the scene do not change over the horizon, so the input's statistics are a
           good prior for the future frame's
  sharpen  an unsharp mask (PIL): adds back some of the detail the VAE and denoiser smooth away

Both work on uint8 (B, H, W, 3) batches and return new arrays; the runner applies them after
decoding, so a rollout feeds the post-processed frame back in (colour balance then also stops the
cast from compounding step after step).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageFilter

from lftk.errors import LftkError

# Bounds on how far colour balance may stretch a channel: a frame whose spread differs more than
# this from the input's has really changed (an arm fills the view), and matching it would be wrong.
STD_RATIO_RANGE = (0.5, 2.0)
UNSHARP_RADIUS = 1.0  # pixels; frames are 64-256 px, details a few pixels wide
UNSHARP_PERCENT = 60  # strength
UNSHARP_THRESHOLD = 2  # levels: leave flat areas (and their noise) alone

PostProcess = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (predicted, current) uint8 -> uint8


def color_balance(predicted: np.ndarray, current: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 predictions with each channel's mean and std moved to the current frame's."""
    pred = predicted.astype(np.float32)
    ref = current.astype(np.float32)
    mu_p, mu_r = pred.mean(axis=(1, 2), keepdims=True), ref.mean(axis=(1, 2), keepdims=True)  # (B, 1, 1, 3)
    sd_p, sd_r = pred.std(axis=(1, 2), keepdims=True), ref.std(axis=(1, 2), keepdims=True)
    ratio = np.clip(sd_r / np.maximum(sd_p, 1e-3), *STD_RATIO_RANGE)
    out = (pred - mu_p) * ratio + mu_r
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def unsharp_mask(predicted: np.ndarray, current: np.ndarray | None = None) -> np.ndarray:
    """(B, H, W, 3) uint8 -> the same, sharpened (the current frame is not needed)."""
    f = ImageFilter.UnsharpMask(radius=UNSHARP_RADIUS, percent=UNSHARP_PERCENT, threshold=UNSHARP_THRESHOLD)
    return np.stack([np.asarray(Image.fromarray(frame).filter(f)) for frame in predicted])


STEPS: dict[str, PostProcess] = {"color": color_balance, "sharpen": unsharp_mask}


def parse_steps(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """'color,sharpen' (or a list) -> ('color', 'sharpen'), in the order given; '' or None -> ()."""
    if spec is None:
        return ()
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        raise LftkError(f"unknown post-processing {', '.join(unknown)}: choose from {', '.join(STEPS)} (comma-separated)")
    if len(set(names)) != len(names):
        raise LftkError(f"post-processing step given twice: {','.join(names)}")
    return tuple(names)


def make_postprocess(spec: str | Sequence[str] | None) -> PostProcess | None:
    """The steps of `spec` chained, or None when there are none."""
    names = parse_steps(spec)
    if not names:
        return None

    def run(predicted: np.ndarray, current: np.ndarray) -> np.ndarray:
        out = predicted
        for name in names:
            out = STEPS[name](out, current)
        return out

    run.steps = names  # type: ignore[attr-defined]  # what timing.json and reports record
    return run
