"""The rollout runner: frames and an instruction in, future frames out, over any backend.

`predict` batches all frames x the three guidance branches into one UNet call per step;
`rollout` feeds each prediction back in as the next current frame (t+Δ, t+2Δ, ...). The sampling
itself is `lftk.export.sampling.IP2PSampler`, the loop the export parity check also runs, so a
backend that passes parity behaves here as it did there.

Seeds: `predict(seed=s)` draws its noise from a generator seeded with s; rollout frame k (1-based)
uses seed + k - 1, so any frame of a rollout can be regenerated alone from its predecessor.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from lftk.errors import LftkError
from lftk.export.sampling import IP2PSampler, images_to_model, make_scheduler, model_to_unit, unit_to_uint8

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "{instruction}"
_EMBED_CACHE = 16  # instructions kept encoded; a rollout reuses one


class Runner:
    def __init__(
        self,
        backend,
        tokenizer,
        scheduler,
        scaling_factor: float,
        resolution: int,
        prompt_template: str = DEFAULT_TEMPLATE,
    ):
        self.backend = backend
        self.tokenizer = tokenizer
        self.resolution = int(resolution)
        self.prompt_template = prompt_template
        self.sampler = IP2PSampler(backend, scheduler, scaling_factor)
        self._embeds: dict[str, torch.Tensor] = {}

    @classmethod
    def from_backend(cls, backend, scheduler: str = "euler_a") -> "Runner":
        """Tokenizer, scheduler config and prompt template from the backend's pipeline dir."""
        from transformers import CLIPTokenizer

        from lftk.model.base import read_meta

        pipe_dir = Path(backend.pipeline_dir)
        for sub in ("tokenizer", "scheduler"):
            if not (pipe_dir / sub).is_dir():
                raise LftkError(f"{pipe_dir}: no {sub}/ dir: not a complete diffusers pipeline")
        tokenizer = CLIPTokenizer.from_pretrained(str(pipe_dir / "tokenizer"))
        config = _read_json(pipe_dir / "scheduler" / "scheduler_config.json")
        template = read_meta(pipe_dir).get("prompt_template", DEFAULT_TEMPLATE)
        return cls(
            backend,
            tokenizer,
            make_scheduler(config, scheduler),
            backend.scaling_factor,
            backend.resolution,
            template,
        )

    def prompt(self, instruction: str) -> str:
        try:
            return self.prompt_template.format(instruction=instruction)
        except (KeyError, IndexError) as exc:
            raise LftkError(
                f"prompt_template {self.prompt_template!r} (lftk_model.json) may only use {{instruction}}"
            ) from exc

    def _prompt_embeds(self, instruction: str) -> torch.Tensor:
        prompt = self.prompt(instruction)
        if prompt not in self._embeds:
            if len(self._embeds) >= _EMBED_CACHE:
                self._embeds.clear()
            self._embeds[prompt] = self.sampler.encode_prompt(self.tokenizer, prompt)  # (2, 77, D)
        return self._embeds[prompt]

    def _check_frames(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        r = self.resolution
        if images.ndim != 4 or images.shape[1:] != (r, r, 3) or images.dtype != np.uint8:
            raise LftkError(
                f"frames must be a (B, {r}, {r}, 3) uint8 array, got {images.shape} {images.dtype} "
                f"(one frame: frame[None]; other sizes: lftk.data.images.load_rgb(path, {r}))"
            )
        return images

    def denoise(
        self,
        images: np.ndarray,
        instruction: str,
        steps: int = 20,
        guidance: float = 7.5,
        image_guidance: float = 1.5,
        seed: int = 0,
    ) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 4, h, w) denoised latents, before decoding (scaled like SD's)."""
        images = self._check_frames(images)
        with torch.inference_mode():
            return self.sampler.denoise(
                images_to_model(images),
                self._prompt_embeds(instruction),
                steps,
                guidance,
                image_guidance,
                torch.Generator().manual_seed(int(seed)),
            )

    def predict(
        self,
        images: np.ndarray,
        instruction: str,
        steps: int = 20,
        guidance: float = 7.5,
        image_guidance: float = 1.5,
        seed: int = 0,
    ) -> np.ndarray:
        """(B, H, W, 3) uint8 current frames -> (B, H, W, 3) uint8 future frames, one UNet call per step."""
        latents = self.denoise(images, instruction, steps, guidance, image_guidance, seed)
        with torch.inference_mode():
            return unit_to_uint8(model_to_unit(self.sampler.decode(latents)))

    def rollout(
        self,
        image: np.ndarray,
        instruction: str,
        frames: int,
        steps: int = 20,
        guidance: float = 7.5,
        image_guidance: float = 1.5,
        seed: int = 0,
    ) -> list[np.ndarray]:
        """(H, W, 3) uint8 -> `frames` predictions, each made from the one before (uint8, as saved)."""
        if frames < 1:
            raise LftkError(f"frames must be >= 1, got {frames}")
        current = np.asarray(image)[None]  # (1, H, W, 3)
        # Each prediction goes back in as uint8, as saved to disk and as the model saw frames in
        # training, rather than as a latent: frame k is then exactly predict(frame k-1, seed + k-1).
        out = []
        for k in range(frames):
            current = self.predict(current, instruction, steps, guidance, image_guidance, seed + k)
            out.append(current[0])
            log.debug("rollout frame %d/%d", k + 1, frames)
        return out


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise LftkError(f"{path}: missing")
    return json.loads(path.read_text())
