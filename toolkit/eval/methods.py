"""What the evaluator compares: the model under test and baselines, all behind one predictor interface.

A predictor maps a batch of `EvalItem`s (current frame at the model's resolution, prompt, seed)
to predicted future frames, (R, R, 3) uint8 each. The model and every baseline are scored by
the same code, so a baseline's figures and the model's are comparable by construction.

`BASELINES` is the one table of baselines: `--baselines` is validated against it and the error
message lists it. A new baseline is one row (and its predictor).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from lftk.data.pairset import Pair
from lftk.errors import LftkError

log = logging.getLogger(__name__)

MODEL_METHOD = "model"  # the name the fine-tuned model's rows carry in reports


@dataclass(frozen=True)
class EvalSettings:
    resolution: int
    prompt_template: str
    steps: int
    guidance: float
    image_guidance: float
    seed: int
    batch_size: int
    device: str


@dataclass(frozen=True)
class EvalItem:
    pair: Pair
    current: np.ndarray  # (R, R, 3) uint8, the model's input
    prompt: str  # instruction after the prompt template
    seed: int  # per-sample noise seed: the prediction does not depend on batch composition


Predictor = Callable[[Sequence[EvalItem]], list[np.ndarray]]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) float in [0, 1] -> uint8, rounded the way diffusers rounds to PIL."""
    return np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)


class PipelinePredictor:
    """The stock StableDiffusionInstructPix2PixPipeline, one call per batch."""

    def __init__(self, pipe, settings: EvalSettings):
        self.pipe = pipe
        self.s = settings

    def __call__(self, items: Sequence[EvalItem]) -> list[np.ndarray]:
        import torch
        from PIL import Image

        # CPU generators: the same seed gives the same noise on every device.
        generators = [torch.Generator("cpu").manual_seed(it.seed) for it in items]
        with torch.inference_mode():
            out = self.pipe(
                prompt=[it.prompt for it in items],
                image=[Image.fromarray(it.current, "RGB") for it in items],
                num_inference_steps=self.s.steps,
                guidance_scale=self.s.guidance,
                image_guidance_scale=self.s.image_guidance,
                generator=generators,
                output_type="np",
            )
        preds = to_uint8(np.asarray(out.images))  # (B, R, R, 3)
        if preds.shape[1:3] != items[0].current.shape[:2]:
            raise RuntimeError(f"pipeline returned {preds.shape[1:3]} frames for {items[0].current.shape[:2]} inputs")
        return list(preds)


def copy_predictor(items: Sequence[EvalItem]) -> list[np.ndarray]:
    """Predict no change: the lower bar a model must clear (most of a scene is static over 10 s)."""
    return [it.current for it in items]


@dataclass(frozen=True)
class Baseline:
    name: str
    description: str
    make: Callable[[EvalSettings], Predictor] | None  # None: listed, not implemented yet


BASELINES: dict[str, Baseline] = {
    b.name: b
    for b in (
        Baseline("copy", "the current frame as the prediction (no motion)", lambda _s: copy_predictor),
        Baseline("zero-shot", "the base InstructPix2Pix model, not fine-tuned", None),
    )
}


def check_baselines(names: Sequence[str] | str) -> list[str]:
    """Validated baseline names in the given order, without repeats; LftkError naming the valid ones."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    valid = ", ".join(BASELINES)
    out: list[str] = []
    for name in names:
        if name == MODEL_METHOD:
            raise LftkError(f"baseline '{name}': the model is always evaluated; baselines are: {valid}")
        if name not in BASELINES:
            raise LftkError(f"unknown baseline '{name}': choose from {valid}")
        if BASELINES[name].make is None:
            raise LftkError(f"baseline '{name}' ({BASELINES[name].description}) is not implemented yet")
        if name not in out:
            out.append(name)
    return out


def make_baselines(names: Sequence[str], settings: EvalSettings) -> dict[str, Predictor]:
    return {name: BASELINES[name].make(settings) for name in check_baselines(names)}  # type: ignore[misc]
