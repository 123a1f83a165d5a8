"""The rollout runner: frames and an instruction in, future frames out, over any backend.

`predict` batches all frames x the three guidance branches into one UNet call per step;
`rollout` feeds each prediction back in as the next current frame (t+Δ, t+2Δ, ...). The sampling
itself is `lftk.runtime.sampler.IP2PSampler`, the loop the export parity check also runs, so a
backend that passes parity behaves here as it did there.

Seeds: `predict(seed=s)` draws its noise from a generator seeded with s; rollout frame k (1-based)
uses seed + k - 1, so any frame of a rollout can be regenerated alone from its predecessor.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from lftk.errors import LftkError
from lftk.runtime.keep import keep_current
from lftk.runtime.params import SamplingParams
from lftk.runtime.contract import MAX_FRAMES, TextEncoderContract
from lftk.runtime.pixels import images_to_model, model_to_uint8
from lftk.runtime.sampler import IP2PSampler, make_scheduler

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "{instruction}"


def prompting(meta: dict) -> tuple[str, list[int]]:
    """A model's prompt template and the horizons it was trained on, from its lftk_model.json."""
    template = meta.get("prompt_template") or DEFAULT_TEMPLATE
    horizons = meta.get("horizons") or ([meta["horizon"]] if meta.get("horizon") else [])
    return template, sorted(int(h) for h in horizons)


def model_prompt(template: str, horizons: Sequence[int], instruction: str, horizon: int | None = None) -> str:
    """The text a model is conditioned on for `instruction`, `horizon` frames ahead (default: the
    largest horizon trained on); a model without {horizon} in its template refuses other horizons."""
    from lftk.data.pairset import format_prompt

    if "{horizon}" not in template:
        if horizon is not None and horizons and horizon not in horizons:
            raise LftkError(
                f"this model predicts {horizons[0]} frames ahead only (its prompt template "
                f"{template!r} has no {{horizon}}); asked for {horizon}"
            )
        return format_prompt(template, instruction)
    default = max(horizons) if horizons else None
    return format_prompt(template, instruction, horizon=default if horizon is None else horizon)


def check_guidance(distilled: dict | None, guidance: float, image_guidance: float) -> None:
    """LftkError when a distilled student (its lftk_model.json "distilled") is asked for guidance
    branches: its scales are baked in and it never learned the unconditioned branches."""
    from lftk.runtime.sampler import uses_cfg

    if distilled and uses_cfg(guidance, image_guidance):
        g, ig = distilled.get("guidance", ["?", "?"])
        raise LftkError(
            f"this model is a distilled student with guidance {g} / image {ig} built in: it runs one UNet call per "
            f"step with guidance 1 / image 1 (its default); asked for {guidance:g} / {image_guidance:g}"
        )


_EMBED_CACHE = 16  # instructions kept encoded; a rollout reuses one
_TEXT_BATCH = TextEncoderContract.batch_profile.max  # prompts per text-encoder call (TensorRT's profile)


class Runner:
    def __init__(
        self,
        backend,
        tokenizer,
        scheduler,
        scaling_factor: float,
        resolution: int,
        prompt_template: str = DEFAULT_TEMPLATE,
        horizons: Sequence[int] = (),
        sampling: SamplingParams | None = None,
        distilled: dict | None = None,
    ):
        self.backend = backend
        # lftk_model.json's "distilled" (guidance baked in at these scales) or None: then more guidance is refused.
        self.distilled = distilled
        # What a call leaves as None (steps, guidance, image guidance): the model's recorded defaults.
        self.sampling = sampling or SamplingParams()
        self.tokenizer = tokenizer
        self.resolution = int(resolution)
        self.prompt_template = prompt_template
        self.horizons = sorted(int(h) for h in horizons)  # frames ahead the model was trained on
        self.sampler = IP2PSampler(backend, scheduler, scaling_factor)
        self._embeds: dict[str, torch.Tensor] = {}  # prompt -> (77, D); "" -> the empty prompt's
        # (predicted, current) uint8 frames -> post-processed frames; None = as the model made them
        self.postprocess: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
        self.scheduler_kind: str | None = None  # the SCHEDULERS key `scheduler` was made from, when known
        # Frames per UNet call (x the CFG branches): the export's batch profile; lower it to save memory.
        self.max_batch = MAX_FRAMES

    @classmethod
    def from_backend(cls, backend, scheduler: str | None = None) -> "Runner":
        """Tokenizer, scheduler config and prompt template from the backend's pipeline dir. `scheduler`
        None: the model's (lftk_model.json sampling: "lcm" for a distilled student), else euler_a."""
        from transformers import CLIPTokenizer

        from lftk.model.base import read_meta

        pipe_dir = Path(backend.pipeline_dir)
        for sub in ("tokenizer", "scheduler"):
            if not (pipe_dir / sub).is_dir():
                raise LftkError(f"{pipe_dir}: no {sub}/ dir: not a complete diffusers pipeline")
        tokenizer = CLIPTokenizer.from_pretrained(str(pipe_dir / "tokenizer"))
        config = _read_json(pipe_dir / "scheduler" / "scheduler_config.json")
        meta = read_meta(pipe_dir)
        template, horizons = prompting(meta)
        sampling = SamplingParams.for_model(meta)
        kind = scheduler or sampling.scheduler
        runner = cls(
            backend,
            tokenizer,
            make_scheduler(config, kind),
            backend.scaling_factor,
            backend.resolution,
            template,
            horizons,
            sampling,
            meta.get("distilled"),
        )
        runner.scheduler_kind = kind
        return runner

    @property
    def default_horizon(self) -> int | None:
        """The offset a plain prediction is for: the horizon trained on (the largest, if several)."""
        return max(self.horizons) if self.horizons else None

    def prompt(self, instruction: str, horizon: int | None = None) -> str:
        return model_prompt(self.prompt_template, self.horizons, instruction, horizon)

    def _prompt_embeds(self, prompts: list[str]) -> torch.Tensor:
        """(T + 1, 77, D) for T prompts (+ the empty prompt last); one text-encoder call for the new ones."""
        new = list(dict.fromkeys(p for p in prompts if p not in self._embeds))
        if new:
            if len(self._embeds) + len(new) > _EMBED_CACHE:
                self._embeds.clear()
                new = list(dict.fromkeys(prompts))  # the cached ones this call needs went with the rest
            for i in range(0, len(new), _TEXT_BATCH - 1):  # + the empty prompt: within the engines' profile
                chunk = new[i : i + _TEXT_BATCH - 1]
                encoded = self.sampler.encode_prompt(self.tokenizer, chunk)  # (len(chunk) + 1, 77, D)
                self._embeds.update({p: encoded[j] for j, p in enumerate(chunk)})
                self._embeds[""] = encoded[-1]  # every encoding carries it: cached whenever a prompt is
        shared = len(set(prompts)) == 1  # T = 1: the sampler expands one row rather than stacking B copies
        rows = [self._embeds[p] for p in (prompts[:1] if shared else prompts)]
        return torch.stack(rows + [self._embeds[""]])

    def _check_frames(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        r = self.resolution
        if images.ndim != 4 or images.shape[1:] != (r, r, 3) or images.dtype != np.uint8:
            raise LftkError(
                f"frames must be a (B, {r}, {r}, 3) uint8 array, got {images.shape} {images.dtype} "
                f"(one frame: frame[None]; other sizes: lftk.data.images.load_rgb(path, {r}))"
            )
        return images

    def _per_frame(self, value, batch: int, name: str) -> list:
        values = list(value) if isinstance(value, (list, tuple)) else [value] * batch
        if len(values) != batch:
            raise LftkError(f"{len(values)} {name} for {batch} frames: give one, or one per frame")
        return values

    def denoise(
        self,
        images: np.ndarray,
        instruction: str | Sequence[str],
        steps: int | None = None,
        guidance: float | None = None,
        image_guidance: float | None = None,
        seed: int | Sequence[int] = 0,
        horizon: int | None | Sequence[int | None] = None,
        image_latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 4, h, w) denoised latents, before decoding (scaled like SD's).

        `instruction`, `seed`, `horizon`: one for all frames, or a list with one per frame. One seed
        draws all frames' noise from one generator (diffusers' way); a list gives each frame its own, so
        frame i comes out as it would alone: that is how separate requests share UNet calls.
        `steps`, `guidance`, `image_guidance` left None are the model's (`self.sampling`).
        """
        p = self.sampling.overridden(steps=steps, guidance=guidance, image_guidance=image_guidance)
        steps, guidance, image_guidance = p.steps, p.guidance, p.image_guidance
        check_guidance(self.distilled, guidance, image_guidance)
        images = self._check_frames(images)
        batch = images.shape[0]
        instructions = self._per_frame(instruction, batch, "instructions")
        horizons = self._per_frame(horizon, batch, "horizons")
        prompts = [self.prompt(i, h) for i, h in zip(instructions, horizons)]
        if isinstance(seed, (list, tuple)):
            generator = [torch.Generator().manual_seed(int(s)) for s in self._per_frame(seed, batch, "seeds")]
        else:
            generator = torch.Generator().manual_seed(int(seed))
        with torch.inference_mode():
            return self.sampler.denoise(
                images_to_model(images), self._prompt_embeds(prompts), steps, guidance, image_guidance, generator,
                image_latents=image_latents,
            )

    def predict(
        self,
        images: np.ndarray,
        instruction: str | Sequence[str],
        steps: int | None = None,
        guidance: float | None = None,
        image_guidance: float | None = None,
        seed: int | Sequence[int] = 0,
        horizon: int | None | Sequence[int | None] = None,
        *,
        keep: float | None = None,
        keep_objects: bool | None = None,
    ) -> np.ndarray:
        """(B, H, W, 3) uint8 current frames -> (B, H, W, 3) uint8 future frames, one UNet call per step.

        `keep` (None: the model's, `self.sampling.keep`): where the decoded prediction differs from the
        current frame as the VAE redraws it by less than this, the current frame's own pixels
        (`lftk.runtime.keep`; one more VAE decode per frame); 0 = off. `keep_objects` (None: the model's):
        objects of the current frame the prediction dropped are put back (`lftk.runtime.objects`).

        More than `max_batch` frames go through in chunks of `max_batch` (the export's batch profile and
        the memory limit); then each frame gets its own generator (seed + its index when one seed is
        given), so a frame's output does not depend on where the chunks fall."""
        images = self._check_frames(images)
        batch = images.shape[0]
        if batch > self.max_batch:
            seeds = self._per_frame(seed, batch, "seeds") if isinstance(seed, (list, tuple)) else [seed + i for i in range(batch)]
            per = {"instruction": self._per_frame(instruction, batch, "instructions"), "seed": seeds,
                   "horizon": self._per_frame(horizon, batch, "horizons")}
            chunks = []
            for lo in range(0, batch, self.max_batch):
                sl = slice(lo, lo + self.max_batch)
                chunks.append(self.predict(images[sl], per["instruction"][sl], steps, guidance, image_guidance,
                                           per["seed"][sl], per["horizon"][sl], keep=keep,
                                           keep_objects=keep_objects))
            return np.concatenate(chunks)
        threshold = self.sampling.keep if keep is None else keep
        objects = self.sampling.keep_objects if keep_objects is None else keep_objects
        current = None
        if threshold > 0:  # keep redraws the frames from the latents the sampler conditions on: one encode
            with torch.inference_mode():
                current = self.backend.encode_image(images_to_model(images))
        latents = self.denoise(images, instruction, steps, guidance, image_guidance, seed, horizon, current)
        with torch.inference_mode():
            out = model_to_uint8(self.sampler.decode(latents))
            redrawn = None if current is None else model_to_uint8(self.backend.decode(current))
            out = keep_current(out, np.asarray(images), redrawn, threshold, objects)
        return self.postprocess(out, np.asarray(images)) if self.postprocess else out

    def rollout(
        self,
        image: np.ndarray,
        instruction: str,
        frames: int,
        steps: int | None = None,
        guidance: float | None = None,
        image_guidance: float | None = None,
        seed: int = 0,
        horizon: int | None = None,
        *,
        keep: float | None = None,
        keep_objects: bool | None = None,
    ) -> list[np.ndarray]:
        """(H, W, 3) uint8 -> `frames` predictions, each made from the one before (uint8, as saved).
        `horizon`: the step Δ in frames, for a model trained on several (default: the largest).
        `keep`, `keep_objects`: as in `predict`, for every step."""
        return self.rollout_many(
            np.asarray(image)[None], [instruction], [frames], steps, guidance, image_guidance, [seed], horizon,
            keep=keep, keep_objects=keep_objects,
        )[0]

    def rollout_many(
        self,
        images: np.ndarray,
        instructions: Sequence[str],
        frames: Sequence[int],
        steps: int | None = None,
        guidance: float | None = None,
        image_guidance: float | None = None,
        seeds: Sequence[int] | None = None,
        horizon: int | None | Sequence[int | None] = None,
        *,
        keep: float | None = None,
        keep_objects: bool | None = None,
    ) -> list[list[np.ndarray]]:
        """Rollouts of B start frames at once: (B, H, W, 3) uint8, one instruction, length, seed (and horizon) each
        -> B lists of predictions. Step k runs the still-unfinished rollouts in one batch, so B rollouts
        cost about max(frames) batched predictions, not sum(frames) single ones.

        Frame k (1-based) of rollout i is exactly predict(its frame k-1, seed_i + k - 1) made alone:
        each prediction goes back in as uint8, as saved to disk and as the model saw frames in
        training, and each rollout draws from its own generator.
        """
        current = self._check_frames(images)
        batch = current.shape[0]
        frames = self._per_frame(frames, batch, "frame counts")
        seeds = self._per_frame(list(seeds) if seeds is not None else 0, batch, "seeds")
        instructions = self._per_frame(list(instructions), batch, "instructions")
        horizons = self._per_frame(horizon, batch, "horizons")  # each rollout's step Δ (None: the model's)
        if min(frames) < 1:
            raise LftkError(f"frames must be >= 1, got {min(frames)}")
        out: list[list[np.ndarray]] = [[] for _ in range(batch)]
        for k in range(max(frames)):
            active = [i for i in range(batch) if frames[i] > k]
            pred = self.predict(
                current[active], [instructions[i] for i in active], steps, guidance, image_guidance,
                [seeds[i] + k for i in active], [horizons[i] for i in active], keep=keep, keep_objects=keep_objects,
            )
            for j, i in enumerate(active):
                out[i].append(pred[j])
            current = current.copy()
            current[active] = pred
            log.debug("rollout step %d/%d (%d frames)", k + 1, max(frames), len(active))
        return out

    def require_horizon_conditioned(self) -> None:
        """LftkError unless the model states the horizon in its prompt (what a sweep needs)."""
        if "{horizon}" not in self.prompt_template:
            raise LftkError(
                f"sweep needs a horizon-conditioned model: this one's prompt template {self.prompt_template!r} "
                "has no {horizon} (train on pairs made with several --horizon values and a template such as "
                "\"Scene {horizon} frames after executing '{instruction}'\"); use --mode rollout"
            )

    def sweep(
        self,
        image: np.ndarray,
        instruction: str,
        horizons: Sequence[int],
        steps: int | None = None,
        guidance: float | None = None,
        image_guidance: float | None = None,
        seed: int = 0,
        *,
        keep: float | None = None,
        keep_objects: bool | None = None,
    ) -> list[np.ndarray]:
        """(H, W, 3) uint8 -> one prediction per horizon (frames ahead), all from this frame, in one batch.
        Needs a model trained with `{horizon}` in its prompt template (several horizons per pair dir)."""
        self.require_horizon_conditioned()
        if not horizons:
            raise LftkError("sweep: no horizons given")
        batch = np.repeat(np.asarray(image)[None], len(horizons), axis=0)
        pred = self.predict(batch, instruction, steps, guidance, image_guidance, [seed] * len(horizons), list(horizons),
                            keep=keep, keep_objects=keep_objects)
        return list(pred)


def _read_json(path: Path) -> dict:
    from lftk.jsonfile import read_object

    return read_object(path)
