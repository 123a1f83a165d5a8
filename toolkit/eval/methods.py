"""What the evaluator compares: the model under test and baselines, all behind one predictor interface.

A predictor maps a batch of `EvalItem`s (current frame at the model's resolution, prompt, seed)
to predicted future frames, (R, R, 3) uint8 each. The model and every baseline are scored by
the same code, so a baseline's figures and the model's are comparable by construction.

`BASELINES` is the one table of baselines: `--baselines` is validated against it and the error
message lists it. A baseline that cannot be had here (the zero-shot base is neither on disk nor
in the hub cache) is listed as unavailable with the reason; the evaluation goes on.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lftk.data.pairset import Pair
from lftk.errors import LftkError
from lftk.runtime.pixels import unit_to_uint8

log = logging.getLogger(__name__)

MODEL_METHOD = "model"  # the name the fine-tuned model's rows carry in reports


PIPELINE_BACKEND = "diffusers pipeline"  # `lftk eval` without --backend: StableDiffusionInstructPix2PixPipeline


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
    keep: float = 0.0  # lftk.runtime.keep's threshold; 0 = the model's frames as they are
    keep_objects: bool = False  # lftk.runtime.objects: put back objects the prediction dropped
    backend: str = PIPELINE_BACKEND  # what ran the model: PIPELINE_BACKEND, or lftk's runner on torch | ort | trt
    precision: str = "fp32"


@dataclass(frozen=True)
class EvalItem:
    pair: Pair
    current: np.ndarray  # (R, R, 3) uint8, the model's input
    prompt: str  # instruction (and the pair's horizon) after the prompt template
    seed: int  # per-sample noise seed: the prediction does not depend on batch composition


Predictor = Callable[[Sequence[EvalItem]], list[np.ndarray]]


def sample_seed(seed: int, name: str) -> int:
    """Noise seed of one sample: fixed by (seed, sample name), whatever else is evaluated with it."""
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])


def make_items(pairs: Sequence[Pair], settings: EvalSettings) -> list[EvalItem]:
    """The model's view of each pair: current frame at the model's resolution, prompt (with the
    pair's own horizon when the template states one), noise seed."""
    from lftk.data.images import load_rgb

    return [
        EvalItem(
            pair=p,
            current=load_rgb(p.current, settings.resolution),
            prompt=p.format(settings.prompt_template),
            seed=sample_seed(settings.seed, p.name),
        )
        for p in pairs
    ]


class PipelinePredictor:
    """The stock StableDiffusionInstructPix2PixPipeline, one call per batch; then `keep` and
    `keep_objects` (`lftk.runtime.keep.keep_current`), as the runner does."""

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
        preds = unit_to_uint8(np.asarray(out.images))  # (B, R, R, 3)
        if preds.shape[1:3] != items[0].current.shape[:2]:
            raise RuntimeError(f"pipeline returned {preds.shape[1:3]} frames for {items[0].current.shape[:2]} inputs")
        if self.s.keep > 0 or self.s.keep_objects:
            from lftk.runtime.keep import keep_current

            current = np.stack([it.current for it in items])
            redrawn = redraw(self.pipe, current) if self.s.keep > 0 else None
            preds = keep_current(preds, current, redrawn, self.s.keep, self.s.keep_objects)
        return list(preds)


class RunnerPredictor:
    """The model through lftk.runtime.runner.Runner over a backend (torch, ort or trt): the sampler,
    graphs and engines `lftk infer` and `lftk serve` run, so the report scores what ships. Each item
    keeps its own noise seed, so a frame here is the frame `lftk infer --seed` gives for that seed."""

    def __init__(self, runner, settings: EvalSettings):
        self.runner = runner
        self.s = settings

    def __call__(self, items: Sequence[EvalItem]) -> list[np.ndarray]:
        images = np.stack([it.current for it in items])
        out = self.runner.predict(
            images, [it.pair.instruction for it in items], self.s.steps, self.s.guidance, self.s.image_guidance,
            seed=[it.seed for it in items], horizon=[it.pair.horizon for it in items],
            keep=self.s.keep, keep_objects=self.s.keep_objects,
        )
        return list(out)


def redraw(pipe, frames: np.ndarray) -> np.ndarray:
    """(B, R, R, 3) uint8 frames as the pipeline's VAE redraws them (decode of the encoder's mode)."""
    import torch
    from PIL import Image

    with torch.inference_mode():
        vae = pipe.vae
        pixels = pipe.image_processor.preprocess([Image.fromarray(f, "RGB") for f in frames]).to(vae.device, vae.dtype)
        decoded = vae.decode(vae.encode(pixels).latent_dist.mode(), return_dict=False)[0]
        return unit_to_uint8(pipe.image_processor.postprocess(decoded, output_type="np"))


def copy_predictor(items: Sequence[EvalItem]) -> list[np.ndarray]:
    """Predict no change: the lower bar a model must clear (most of a scene is static over 10 s)."""
    return [it.current for it in items]


@dataclass(frozen=True)
class Baseline:
    name: str
    description: str
    per_pair: bool  # True: a predictor scored on every pair; False: its own section (rollout)


BASELINES: dict[str, Baseline] = {
    b.name: b
    for b in (
        Baseline("copy", "the current frame as the prediction (no motion)", True),
        Baseline("zero-shot", "the untuned base model the run started from (the paper's pre-evaluation)", True),
        Baseline("rollout", "the model fed its own outputs: t+Δ, then t+2Δ from its t+Δ, ...", False),
    )
}
DEFAULT_BASELINES = ("copy", "zero-shot", "rollout")


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
        if name not in out:
            out.append(name)
    return out


def load_base_pipeline(meta: dict, device: str):
    """(pipeline, "") for the base the model was fine-tuned from, or (None, why it cannot be had).

    The base is `base` in the model's lftk_model.json: a local dir (relative paths are read from
    the current dir, as training read them) or a hub id, used only if already in the local cache:
    evaluation never downloads.
    """
    from lftk.model.base import load_pipeline, looks_like_hub_id

    base = meta.get("base")
    if not base:
        return None, "the model records no base (no 'base' in lftk_model.json): it is not a fine-tuned run"
    local = Path(str(base)).expanduser()
    if not local.exists():
        if not looks_like_hub_id(base):
            return None, f"base model dir {base} not found (relative to {Path.cwd()})"
        cached = _hub_snapshot(str(base))
        if cached is None:
            return None, f"base {base} is a hub id not in the local cache; evaluation never downloads (fetch it first)"
        local = cached
    try:
        pipe = load_pipeline(local)
    except LftkError as exc:
        return None, str(exc)
    pipe.to(device)
    return pipe, ""


def _hub_snapshot(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, "model_index.json")
    return Path(found).parent if isinstance(found, str) else None


def make_baselines(
    names: Sequence[str], settings: EvalSettings, meta: dict
) -> tuple[dict[str, Predictor], dict[str, str]]:
    """Predictors of the per-pair baselines among `names`, and {name: reason} for those unavailable."""
    predictors: dict[str, Predictor] = {}
    unavailable: dict[str, str] = {}
    for name in check_baselines(names):
        if name == "copy":
            predictors[name] = copy_predictor
        elif name == "zero-shot":
            pipe, why = load_base_pipeline(meta, settings.device)
            if pipe is None:
                log.warning("zero-shot baseline unavailable: %s", why)
                unavailable[name] = why
            else:
                predictors[name] = PipelinePredictor(pipe, replace(settings, keep=0.0, keep_objects=False))  # tuned per model
    return predictors, unavailable
