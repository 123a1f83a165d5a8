"""`lftk train`: set up a run, train with DeepSpeed, write checkpoints and a final pipeline.

Small `setup_*` steps and a short loop (STYLE.md: no 600-line main).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import default_collate

from lftk.config import Recipe
from lftk.errors import LftkError
from lftk.model.base import load_pipeline, read_meta, write_meta
from lftk.model.components import vae_scale_factor
from lftk.progress import progress_bar
from lftk.data.pairset import PairSet
from lftk.train import checkpoint
from lftk.train.data import PairDataset, make_loader
from lftk.train.engine import setup_engine
from lftk.train.objective import FrozenParts, ip2p_loss
from lftk.train.rundir import RunDir, replace_dir

log = logging.getLogger(__name__)


@dataclass
class Setup:
    recipe: Recipe
    run: RunDir
    pipe: object
    parts: FrozenParts
    train_set: PairDataset
    val_set: PairDataset | None
    rank: int
    world: int


def setup(recipe: Recipe, resume: bool) -> Setup:
    from diffusers import DDPMScheduler

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    torch.manual_seed(recipe.seed)
    pipe = load_pipeline(recipe.model.base, revision=recipe.model.revision)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    # Frozen parts only run forward: half precision on GPU halves their memory (no master copy needed).
    frozen_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(recipe.train.precision) if device.type == "cuda" else None
    for frozen in (pipe.vae, pipe.text_encoder):
        frozen.requires_grad_(False).eval().to(device)
        if frozen_dtype is not None:
            frozen.to(dtype=frozen_dtype)
    parts = FrozenParts(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        null_ids=pipe.tokenizer("", padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids,
        scaling_factor=float(pipe.vae.config.scaling_factor),
        vae_scale=vae_scale_factor(pipe.vae),
    )
    d = recipe.data
    res = recipe.train.resolution
    train_set = PairDataset(PairSet(d.path, d.train_split), res, pipe.tokenizer, d.prompt_template)
    val_items = PairSet(d.path, d.val_split) if (Path(d.path) / d.val_split).is_dir() else []
    val_set = PairDataset(val_items, res, pipe.tokenizer, d.prompt_template) if val_items else None
    if recipe.train.cache_latents:
        for split, dataset in ((d.train_split, train_set), (d.val_split, val_set)):
            if dataset is not None:
                dataset.latents = _latents(recipe, pipe.vae, split, dataset, rank)
    global_batch = recipe.train.batch_size * world
    if len(train_set) < global_batch:
        raise LftkError(
            f"{d.path}/{d.train_split}: {len(train_set)} training pairs, fewer than one batch of {global_batch} "
            "(lower train.batch_size or make more pairs)"
        )
    run = RunDir(recipe.output_dir)  # created only once the inputs are known to be good
    if rank == 0:
        run.create(recipe, resume)
    return Setup(recipe, run, pipe, parts, train_set, val_set, rank, world)


def _latents(recipe: Recipe, vae, split: str, dataset: PairDataset, rank: int):
    from lftk.train import latent_cache

    root = Path(recipe.data.latent_cache or Path(recipe.data.path) / ".latents")
    path = latent_cache.cache_dir(root, vae, recipe.train.resolution, split)
    if rank == 0:
        latent_cache.build(dataset._pixels, dataset.items, vae, path)
    else:
        latent_cache.wait_for(path, [p.name for p in dataset.items])
    return latent_cache.LatentArrays(path)


def total_steps(s: Setup) -> int:
    r = s.recipe
    if r.max_steps is not None:
        return r.max_steps
    global_batch = r.train.batch_size * r.train.grad_accum * s.world
    return max(1, len(s.train_set) // global_batch) * (r.train.epochs or 1)


@torch.no_grad()
def val_loss(unet, s: Setup, max_batches: int = 8) -> float | None:
    """Diffusion loss on the val split with fixed noise, so the figure is comparable across steps."""
    if s.val_set is None:
        return None
    unet.eval()
    bs = s.recipe.train.batch_size
    losses = []
    for start in range(0, min(len(s.val_set), bs * max_batches), bs):
        batch = default_collate([s.val_set[i] for i in range(start, min(start + bs, len(s.val_set)))])
        losses.append(ip2p_loss(unet, s.parts, batch, 0.0, s.recipe.seed + 1).item())
    unet.train()
    return sum(losses) / len(losses)


def _save_final(engine, s: Setup, step: int, last_loss: float) -> None:
    if s.rank != 0:
        return
    tmp = s.run.root / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    unet = engine.module
    if s.recipe.train.trainable == "lora":
        from lftk.train.lora import merged_copy, save_lora

        save_lora(unet, s.recipe.train.lora, tmp / "lora")
        unet = merged_copy(unet)
    s.pipe.unet = unet
    s.pipe.save_pretrained(str(tmp))
    base_meta = read_meta(Path(s.recipe.model.base)) if Path(s.recipe.model.base).is_dir() else {}
    pairs_meta = Path(s.recipe.data.path) / "pairs.json"
    horizon = None
    if pairs_meta.is_file():
        import json

        horizon = json.loads(pairs_meta.read_text()).get("horizon")
    write_meta(
        tmp,
        {
            **base_meta,
            "base": s.recipe.model.base,
            "trainable": s.recipe.train.trainable,
            "resolution": s.recipe.train.resolution,
            "prompt_template": s.recipe.data.prompt_template,
            "horizon": horizon,
            "steps": step,
            "final_loss": last_loss,
            "precision": s.recipe.train.precision,
            "lora": s.recipe.train.lora.model_dump() if s.recipe.train.trainable == "lora" else None,
        },
    )
    replace_dir(tmp, s.run.final)


def train(recipe: Recipe, resume: bool = False) -> RunDir:
    s = setup(recipe, resume)
    unet = s.pipe.unet
    if recipe.train.trainable == "lora":
        from lftk.train.lora import add_lora

        add_lora(unet, recipe.train.lora)
    if recipe.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    engine, _ = setup_engine(unet, recipe)
    step = 0
    if resume:
        step = checkpoint.load(engine, s.run.checkpoints)
        if s.rank == 0:
            s.run.truncate_metrics(step)
    steps = total_steps(s)
    accum = recipe.train.grad_accum
    loader = make_loader(
        s.train_set, recipe.train.batch_size, accum, s.rank, s.world, recipe.seed, step * accum, recipe.data.num_workers
    )
    t0, last = time.perf_counter(), float("nan")
    micro = iter(loader)
    with progress_bar("train", total=steps, completed=step, enabled=s.rank == 0) as advance:
        while step < steps:
            for _ in range(accum):
                loss = ip2p_loss(engine, s.parts, next(micro), recipe.train.conditioning_dropout, recipe.seed)
                if not math.isfinite(loss.item()):
                    raise LftkError(f"loss is {loss.item()} at step {step}: stopping; the last good checkpoint is kept")
                engine.backward(loss)
                engine.step()
            step += 1
            last = loss.item()
            advance(1)
            if s.rank == 0 and (step % recipe.train.log_every == 0 or step == steps):
                s.run.log_metrics({"step": step, "loss": last, "lr": engine.get_lr()[0], "elapsed_s": round(time.perf_counter() - t0, 2)})
            every = recipe.train.checkpoint_every
            if (every and step % every == 0) or step == steps:
                vl = val_loss(engine.module, s)
                if s.rank == 0 and vl is not None:
                    s.run.log_metrics({"step": step, "val_loss": vl})
                checkpoint.save(engine, s.run.checkpoints, step, s.rank, recipe.train.keep_checkpoints)
    _save_final(engine, s, step, last)
    if s.rank == 0:
        s.run.plot_loss()
        log.info("trained %d steps in %.0f s; final model: %s", step, time.perf_counter() - t0, s.run.final)
    return s.run
