"""The Python API: `lftk.load(PATH)` -> a `Predictor` a robot's control loop calls in-process.

    import lftk

    p = lftk.load("demo/export", backend="ort")                # an export, run dir or pipeline dir
    future = p.predict("frame.png", "beat the block with the hammer")   # a PIL image, one horizon ahead
    frames = p.rollout(future, "beat the block with the hammer", frames=5)

Images go in as PIL images, (H, W, 3) uint8 arrays or image paths, of any size and shape: they are
centre-cropped to a square and resized to the model's resolution, as `lftk infer` does with files
(upscaling at most MAX_UPSCALE times). Frames come out as PIL images at the model's resolution.
Sampling options are keywords with the names and defaults of `lftk infer`'s options; left None they
are the model's own (lftk_model.json "sampling"). `lftk infer` and `lftk serve` are built on this.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image

from lftk.data.images import load_rgb, to_square_rgb
from lftk.errors import LftkError

log = logging.getLogger(__name__)

MAX_UPSCALE = 4  # a frame may be upscaled up to 4x to the model's side; smaller ones hold too little to predict from
DEFAULT_FRAMES = 15  # `lftk infer --frames`

ImageLike = Union[Image.Image, np.ndarray, str, Path]


def check_side(side: int, resolution: int, name: str) -> None:
    """LftkError when a frame's shorter side is under resolution / MAX_UPSCALE."""
    if side * MAX_UPSCALE < resolution:
        raise LftkError(
            f"{name}: {side} px on its shorter side; the model works at {resolution} px and lftk upscales frames at "
            f"most {MAX_UPSCALE}x (at least {-(-resolution // MAX_UPSCALE)} px)"
        )


def check_frame(path: Path | str, resolution: int) -> Path | str:
    """`path`, or LftkError when its shorter side is too small (read from the header only)."""
    try:
        with Image.open(path) as im:
            side = min(im.size)
    except Exception:  # unreadable: load_rgb names the file and the reason
        return path
    check_side(side, resolution, str(path))
    return path


def to_frame(image: ImageLike, resolution: int) -> np.ndarray:
    """A PIL image, (H, W, 3) or (H, W, 4) uint8 array or image path -> the model's (R, R, 3) uint8 frame."""
    if isinstance(image, (str, Path)):
        return load_rgb(check_frame(image, resolution), resolution)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
            raise LftkError(
                f"an image array must be (H, W, 3) uint8 RGB (or RGBA), got {image.shape} {image.dtype}"
            )
        image = Image.fromarray(image, "RGB" if image.shape[2] == 3 else "RGBA")
    if not isinstance(image, Image.Image):
        raise LftkError(f"an image must be a PIL image, a uint8 array or a path, got {type(image).__name__}")
    check_side(min(image.size), resolution, "image")
    return np.asarray(to_square_rgb(image, resolution), dtype=np.uint8)


def warn_long_instruction(tokenizer, instruction: str) -> None:
    """CLIP reads `model_max_length` tokens (77): say so when an instruction is cut there."""
    limit = getattr(tokenizer, "model_max_length", 77)
    n = len(tokenizer(instruction, truncation=False)["input_ids"])
    if n > limit:
        log.warning("the instruction has %d tokens: the text encoder reads the first %d, the rest is cut", n, limit)


class Predictor:
    """Future frames from one model on one backend. Not thread-safe: one predictor per thread
    (`lftk serve` batches concurrent requests onto one instead)."""

    def __init__(self, runner, model: str | Path, scheduler: str | None = None):
        self.runner = runner
        self.model = str(model)
        self.scheduler = scheduler or runner.scheduler_kind  # the SCHEDULERS key sampling runs with

    @property
    def backend(self):
        """The backend the networks run on (`.name`, `.precision`, `.providers`, per-network timings)."""
        return self.runner.backend

    @property
    def resolution(self) -> int:
        return self.runner.resolution

    @property
    def sampling(self):
        """The model's own sampling defaults (`lftk.runtime.params.SamplingParams`)."""
        return self.runner.sampling

    @property
    def horizons(self) -> list[int]:
        """Frames ahead the model was trained on."""
        return list(self.runner.horizons)

    def frame(self, image: ImageLike) -> np.ndarray:
        """`image` as the model sees it: (R, R, 3) uint8."""
        return to_frame(image, self.resolution)

    def _inputs(self, image: ImageLike, instruction: str) -> np.ndarray:
        """The frame, after the instruction is checked (empty: an error; longer than CLIP reads: a warning)."""
        if not isinstance(instruction, str) or not instruction.strip():
            raise LftkError("the instruction is empty: say what the robot does, e.g. 'stack the blocks'")
        warn_long_instruction(self.runner.tokenizer, instruction)
        return self.frame(image)

    def predict(
        self,
        image: ImageLike,
        instruction: str,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        image_guidance: float | None = None,
        seed: int = 0,
        horizon: int | None = None,
        keep: float | None = None,
        keep_objects: bool | None = None,
    ) -> Image.Image:
        """The frame `horizon` frames after `image` (default: the horizon the model was trained on)."""
        current = self._inputs(image, instruction)
        out = self.runner.predict(current[None], instruction, steps, guidance, image_guidance, seed, horizon,
                                  keep=keep, keep_objects=keep_objects)
        return Image.fromarray(out[0], "RGB")

    def rollout(
        self,
        image: ImageLike,
        instruction: str,
        frames: int = DEFAULT_FRAMES,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        image_guidance: float | None = None,
        seed: int = 0,
        horizon: int | None = None,
        keep: float | None = None,
        keep_objects: bool | None = None,
    ) -> list[Image.Image]:
        """`frames` predictions, each made from the one before, `horizon` frames apart (exactly
        `lftk infer --mode rollout`'s frames for the same options)."""
        if frames < 1:
            raise LftkError(f"frames must be >= 1, got {frames}")
        current = self._inputs(image, instruction)
        out = self.runner.rollout(current, instruction, frames, steps, guidance, image_guidance, seed, horizon,
                                  keep=keep, keep_objects=keep_objects)
        return [Image.fromarray(f, "RGB") for f in out]

    def sweep(
        self,
        image: ImageLike,
        instruction: str,
        horizons: Sequence[int],
        *,
        steps: int | None = None,
        guidance: float | None = None,
        image_guidance: float | None = None,
        seed: int = 0,
        keep: float | None = None,
        keep_objects: bool | None = None,
    ) -> list[Image.Image]:
        """One prediction per horizon, all from `image`, in one batch (a horizon-conditioned model)."""
        current = self._inputs(image, instruction)
        out = self.runner.sweep(current, instruction, [int(h) for h in horizons], steps, guidance, image_guidance, seed,
                                keep=keep, keep_objects=keep_objects)
        return [Image.fromarray(f, "RGB") for f in out]


def load(
    model: str | Path,
    backend: str = "ort",
    *,
    precision: str | None = None,
    scheduler: str | None = None,
    compile: bool = False,
    postprocess: str | Sequence[str] | None = None,
    providers: Sequence[str] | None = None,
) -> Predictor:
    """A predictor for MODEL (an export dir for ort and trt; any model dir for torch), with the
    options of `lftk infer`: `backend` torch|ort|trt, `precision` (ort default fp32, trt fp16, torch
    fp32), `scheduler` euler_a|ddim|dpmpp|lcm (default: the model's: lcm for a distilled student, else
    euler_a), `compile` (torch only), `postprocess` steps (e.g. "denoise")."""
    from lftk.model.postprocess import make_postprocess
    from lftk.runtime.backends import open_backend
    from lftk.runtime.runner import Runner

    post = make_postprocess(postprocess)  # a typo fails before the model loads
    be = open_backend(model, backend, providers=providers, precision=precision, compile=compile)
    runner = Runner.from_backend(be, scheduler)
    runner.postprocess = post
    return Predictor(runner, model, scheduler)
