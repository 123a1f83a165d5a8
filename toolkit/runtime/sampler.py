"""InstructPix2Pix sampling over any backend that offers the four network calls.

The loop follows diffusers' `StableDiffusionInstructPix2PixPipeline` step for step (branch order,
unscaled image latents, `scale_model_input`, the same generator draws), so that with torch modules
it reproduces the pipeline's output for the same seed. It is the one sampler of lftk
(the runtime core, `lftk.runtime`): the export's parity check, `lftk eval --backend`, infer and
serve all run this loop; the runner (`lftk.runtime.runner`) builds on it. Frames and instructions (uint8, prompt templates, rollouts) are
the runner's business, not this module's.
"""

from __future__ import annotations

import copy
import inspect
from typing import Protocol

import torch

from lftk.errors import LftkError
from lftk.runtime.contract import CFG_BRANCHES, TEXT_SEQ_LEN

SCHEDULERS = {
    "euler_a": "EulerAncestralDiscreteScheduler",  # what InstructPix2Pix ships with
    "ddim": "DDIMScheduler",  # deterministic at eta=0: handy for comparing backends
    "dpmpp": "DPMSolverMultistepScheduler",  # DPM-Solver++ (2nd order): good frames in ~10-20 steps
    "lcm": "LCMScheduler",  # a distilled student's (lftk train with distill:): 1-4 steps, one UNet call each
}


class Networks(Protocol):
    """The four calls a backend answers; tensors are torch, on the host, float32 unless stated."""

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(N, 77) int64 -> (N, 77, D)."""

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 4, h, w), the unscaled latent mean."""

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, 8, h, w), (B,) float32, (B, 77, D) -> (B, 4, h, w) noise prediction."""

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, 4, h, w) unscaled latent -> (B, 3, H, W) in about [-1, 1]."""


def make_scheduler(config, kind: str = "euler_a"):
    """A diffusers scheduler of `kind` built from a pipeline's scheduler config (dict or FrozenDict)."""
    import diffusers

    if kind not in SCHEDULERS:
        raise LftkError(f"unknown scheduler '{kind}': choose one of {', '.join(SCHEDULERS)}")
    config = dict(config)
    extra = {"algorithm_type": "dpmsolver++", "solver_order": 2} if kind == "dpmpp" else {}
    if kind == "ddim" and "clip_sample" not in config:
        # DDIM's own default clips each step's x0 estimate to [-1, 1]: right for pixels, wrong for latents
        # (their std is ~1: clipping flattens them). Stable Diffusion's DDIM config says false; configs
        # of other schedulers do not say.
        extra["clip_sample"] = False
    return getattr(diffusers, SCHEDULERS[kind]).from_config({**config, **extra})


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """(N, 77) int64 ids, padded and truncated the way the diffusers pipeline does it."""
    ids = tokenizer(prompts, padding="max_length", max_length=TEXT_SEQ_LEN, truncation=True, return_tensors="pt")
    return ids.input_ids.to(torch.int64)


def _step_kwargs(scheduler, generator: torch.Generator | None, eta: float) -> dict:
    # Euler ancestral draws noise from the generator; DDIM takes eta; neither takes both.
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def guided(noise_text, noise_image, noise_uncond, guidance: float, image_guidance: float):
    """InstructPix2Pix's guidance: the three branches' outputs (text and image, image only, neither)
    combined into one (the pipeline's formula; training's distillation teacher uses it too)."""
    return noise_uncond + guidance * (noise_text - noise_image) + image_guidance * (noise_image - noise_uncond)


def uses_cfg(guidance: float, image_guidance: float) -> bool:
    """The pipeline's switch: below these scales guidance is a no-op, so one branch is run, not three."""
    return guidance > 1.0 and image_guidance >= 1.0


class IP2PSampler:
    """Denoise latents conditioned on a frame and an instruction, over one backend's networks."""

    def __init__(self, nets: Networks, scheduler, scaling_factor: float):
        self.nets = nets
        self.scheduler = scheduler  # a template: each call builds a fresh one (schedulers keep step state)
        self.scaling_factor = float(scaling_factor)

    def encode_prompt(self, tokenizer, prompt: str | list[str]) -> torch.Tensor:
        """(T + 1, 77, D): the embeddings of T prompts, then the empty prompt's, in one text-encoder call."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        return self.nets.encode_text(tokenize(tokenizer, prompts + [""]))

    def denoise(
        self,
        images: torch.Tensor,
        prompt_embeds: torch.Tensor,
        steps: int,
        guidance: float,
        image_guidance: float,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        image_latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, 3, H, W) frames in [-1, 1] + (T + 1, 77, D) embeddings -> (B, 4, h, w) scaled latents.

        `prompt_embeds`: T = 1 text row shared by all frames, or T = B rows, one per frame; the last row
        is the empty prompt's (what `encode_prompt` returns). `generator`: one for the whole batch, or a
        list of B, one per frame (diffusers draws each frame's noise from its own): then a frame's output
        does not depend on what else is in the batch, so requests can share UNet calls.
        `image_latents`: the frames' `encode_image`, when the caller has it already (it is not redone).
        """
        from diffusers.utils.torch_utils import randn_tensor

        if steps < 1:
            raise LftkError(f"steps must be >= 1, got {steps}")
        scheduler = copy.deepcopy(self.scheduler)  # the template is never stepped; a copy is 3x cheaper than from_config
        scheduler.set_timesteps(steps)
        batch = images.shape[0]
        text, uncond = prompt_embeds[:-1], prompt_embeds[-1:]
        if text.shape[0] not in (1, batch):
            raise LftkError(f"{text.shape[0]} prompt embeddings for {batch} frames: give 1 or one per frame")
        if isinstance(generator, list) and len(generator) != batch:
            raise LftkError(f"{len(generator)} generators for {batch} frames: give 1 or one per frame")
        if image_latents is None:  # (B, 4, h, w), unscaled: IP2P conditions on it as is
            image_latents = self.nets.encode_image(images)
        text = text.expand(batch, -1, -1)  # (B, 77, D)
        cfg = uses_cfg(guidance, image_guidance)
        if cfg:
            # (3B, 77, D): text x B ‖ empty x B ‖ empty x B, branch-major like diffusers
            embeds = torch.cat([text, uncond.expand(batch, -1, -1), uncond.expand(batch, -1, -1)])
            # (3B, 4, h, w): image ‖ image ‖ zeros -- the third branch drops the frame too
            cond = torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)])
        else:
            embeds, cond = text, image_latents
        branches = CFG_BRANCHES if cfg else 1
        if latents is None:
            latents = randn_tensor(
                tuple(image_latents.shape), generator=generator, device=image_latents.device, dtype=image_latents.dtype
            )
        latents = latents * scheduler.init_noise_sigma
        step_kwargs = _step_kwargs(scheduler, generator, eta)
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([latents] * branches), t)
            model_in = torch.cat([model_in, cond], dim=1)  # (3B, 8, h, w): noisy latent ‖ image latent
            timestep = t.to(torch.float32).expand(model_in.shape[0])  # (3B,) float32, see contract
            noise = self.nets.unet(model_in, timestep, embeds)
            if cfg:
                noise = guided(*noise.chunk(CFG_BRANCHES), guidance, image_guidance)
            latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
        return latents

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 4, h, w) scaled latents -> (B, 3, H, W) images in about [-1, 1]."""
        return self.nets.decode(latents / self.scaling_factor)
