"""Base pipelines: build one from a preset (`lftk init-base`), load one the way users do.

`load_pipeline` is the single loader: a local diffusers dir (ours, or a downloaded
timbrooks/instruct-pix2pix) or a hub id, through `StableDiffusionInstructPix2PixPipeline.from_pretrained`.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
import torch

from lftk.jsonfile import read_object
from lftk.errors import LftkError
from lftk.runtime.layout import MODEL_META
from lftk.model.components import build_components, make_scheduler, preset_spec

log = logging.getLogger(__name__)

PIPELINE_CLASS = "StableDiffusionInstructPix2PixPipeline"
LFTK_META = MODEL_META  # what lftk knows about a pipeline dir (preset, training, resolution...)


def assemble_pipeline(unet, vae, text_encoder, tokenizer, scheduler=None):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    return StableDiffusionInstructPix2PixPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler or make_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def write_meta(model_dir: Path, meta: dict) -> None:
    path = Path(model_dir) / LFTK_META
    old = read_object(path, missing={})
    old.update(meta)
    path.write_text(json.dumps(old, indent=2, sort_keys=True))


def read_meta(model_dir: Path) -> dict:
    path = Path(model_dir) / LFTK_META
    return read_object(path, missing={})


def init_base(
    out: Path,
    preset: str = "tiny",
    frames: Path | None = None,
    vae_steps: int | None = None,
    seed: int = 0,
    bpe_path: Path | None = None,
) -> tuple[Path, dict]:
    """Write a StableDiffusionInstructPix2PixPipeline dir built from a preset's configs; returns it
    and its metadata (lftk_model.json).

    For a preset with a VAE fit (`tiny`), the VAE is fitted on the frames under `frames` (an episodes
    dir, a pair dir or a dir of frames; see `lftk.model.vae_fit.collect_frames`), with the preset's
    settings and `vae_steps` steps when given: a random VAE would make every later metric meaningless.
    """
    from dataclasses import replace

    from lftk.model.tokenizer import build_clip_tokenizer

    spec = preset_spec(preset)
    out = Path(out)
    if (out / "model_index.json").exists():
        raise LftkError(f"{out} already holds a pipeline; choose a new OUT or delete it")
    t0 = time.perf_counter()
    parts = build_components(preset, seed=seed)
    meta: dict = {"preset": preset, "seed": seed}
    fit = spec.vae_fit
    if fit is not None and vae_steps is not None:
        fit = replace(fit, steps=vae_steps)
    if fit is not None and fit.steps == 0:
        log.warning("%s preset with --vae-steps 0: the VAE keeps its random weights (fine for timing and plumbing)", preset)
    elif fit is not None:
        if frames is None:
            raise LftkError(f"the {preset} preset fits its VAE on frames: pass --frames DIR (episodes or pairs), or --vae-steps 0")
        from lftk.model.vae_fit import collect_frames, fit_vae

        fit_refs, heldout, how = collect_frames(Path(frames))
        log.info("vae fit frames from %s (%s): %d to fit, %d held out", frames, how, len(fit_refs), len(heldout))
        meta["vae_fit"] = {"frames_from": str(frames), "split": how,
                           **fit_vae(parts["vae"], fit_refs, fit, heldout=heldout, seed=seed)}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_clip_tokenizer(Path(tmp) / "tokenizer", bpe_path)
        pipe = assemble_pipeline(parts["unet"], parts["vae"], parts["text_encoder"], tokenizer,
                                 make_scheduler(spec.prediction_type))
        out.mkdir(parents=True, exist_ok=True)
        pipe.save_pretrained(str(out))
    meta["scaling_factor"] = float(parts["vae"].config.scaling_factor or spec.scaling_factor)
    write_meta(out, meta)
    log.info("base pipeline (%s) written to %s in %.1f s", preset, out, time.perf_counter() - t0)
    return out, meta


def looks_like_hub_id(ref: str | Path) -> bool:
    """Whether a model reference that is not a dir here reads as a hub id ("owner/name"), not a path."""
    ref = str(ref)
    return not ref.startswith((".", "/", "~")) and ref.count("/") == 1


def load_pipeline(ref: str | Path, dtype: torch.dtype = torch.float32, revision: str | None = None):
    """Load an InstructPix2Pix pipeline from a local dir or a hub id; a clear error otherwise."""
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # one bar per component buries lftk's own log lines
    ref = str(ref)
    local = Path(ref)
    if local.exists() and not (local / "model_index.json").is_file():
        raise LftkError(f"{ref}: not a diffusers pipeline dir (no model_index.json)")
    if not local.exists() and not looks_like_hub_id(ref):
        raise LftkError(f"{ref}: model dir not found")
    try:
        pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
            ref, dtype=dtype, safety_checker=None, requires_safety_checker=False, revision=revision
        )
    except OSError as exc:
        raise LftkError(
            f"{ref}: cannot load pipeline ({exc.__class__.__name__}): download the weights and pass the local dir"
        ) from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe
