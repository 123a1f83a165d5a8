"""The benchmark's peer: diffusers' stock StableDiffusionInstructPix2PixPipeline on the same weights.

What a user who does not pick lftk runs. `PipelineRunner` gives it the two calls the bench times
(`predict`, `rollout`) with lftk's scheduler, steps, guidance scales, prompt and seed, and a
`backend` that times its UNet calls the way lftk's backends do, so its row is measured like every
other. It applies no `keep` rules (the stock pipeline has none): its frames are compared with lftk
torch's made with the rules off.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from lftk.errors import NotAvailableError
from lftk.runtime.params import SamplingParams
from lftk.runtime.pixels import unit_to_uint8

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class _UnetTimer:
    """Per-call wall time of the pipeline's UNet (forward hooks; the GPU synchronised at each end)."""

    name = "diffusers"

    def __init__(self, unet, device: torch.device, precision: str):
        self.device, self.precision = device, precision
        self.providers = [f"diffusers ({device.type})"]
        self.stats: dict[str, list] = {}
        self._t0 = 0.0
        unet.register_forward_pre_hook(self._start)
        unet.register_forward_hook(self._stop)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _start(self, *_):
        self._sync()
        self._t0 = time.perf_counter()

    def _stop(self, *_):
        self._sync()
        calls, total = self.stats.get("unet", [0, 0.0])
        self.stats["unet"] = [calls + 1, total + time.perf_counter() - self._t0]

    def reset_stats(self) -> None:
        self.stats = {}

    def ms_per_call(self, component: str) -> float | None:
        calls, total = self.stats.get(component, [0, 0.0])
        return 1000 * total / calls if calls else None


class PipelineRunner:
    """The stock pipeline behind the bench's runner calls (uint8 frames in and out)."""

    def __init__(self, pipeline_dir: Path, precision: str, resolution: int, scheduler: str):
        from lftk.model.base import load_pipeline, read_meta
        from lftk.runtime.runner import model_prompt, prompting
        from lftk.runtime.sampler import make_scheduler

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if precision not in TORCH_DTYPES:
            raise NotAvailableError(f"the diffusers row runs fp32 (and fp16 on a CUDA GPU), not {precision}")
        if precision == "fp16" and device.type != "cuda":
            raise NotAvailableError("diffusers fp16 runs on a CUDA GPU")
        self.pipe = load_pipeline(pipeline_dir, dtype=TORCH_DTYPES[precision]).to(device)
        self.pipe.scheduler = make_scheduler(self.pipe.scheduler.config, scheduler)
        meta = read_meta(Path(pipeline_dir))
        self.sampling = SamplingParams.for_model(meta)
        template, horizons = prompting(meta)
        self._prompt = lambda instruction: model_prompt(template, horizons, instruction)  # as lftk's runner prompts
        self.resolution = int(resolution)
        self.backend = _UnetTimer(self.pipe.unet, device, precision)

    def predict(self, images: np.ndarray, instruction: str, steps: int, seed: int = 0) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, H, W, 3) uint8, one pipeline call, one generator for the batch."""
        from PIL import Image

        images = np.asarray(images)
        with torch.inference_mode():
            out = self.pipe(
                prompt=[self._prompt(instruction)] * len(images),
                image=[Image.fromarray(f, "RGB") for f in images],
                num_inference_steps=steps,
                guidance_scale=self.sampling.guidance,
                image_guidance_scale=self.sampling.image_guidance,
                generator=torch.Generator("cpu").manual_seed(int(seed)),
                output_type="np",
            )
        return unit_to_uint8(out.images)

    def rollout(self, image: np.ndarray, instruction: str, frames: int, steps: int, seed: int = 0) -> list[np.ndarray]:
        """`frames` predictions, each from the one before, seed + k for step k (as lftk's runner)."""
        current, out = np.asarray(image), []
        for k in range(frames):
            current = self.predict(current[None], instruction, steps, seed=seed + k)[0]
            out.append(current)
        return out
