"""`lftk train`: set up a run, train with DeepSpeed, write checkpoints and a final pipeline.

Small `setup_*` steps and a short loop rather than one long main().
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import default_collate

from lftk.config import Recipe
from lftk.errors import LftkError
from lftk.model.base import load_pipeline, read_meta, write_meta
from lftk.model.components import vae_scale_factor
from lftk.data.pairset import PairSet
from lftk.progress import progress_bar
from lftk.train import checkpoint
from lftk.train.data import PairDataset, check_prompts, make_loader
from lftk.train.engine import setup_engine
from lftk.train.aux_losses import AuxLosses
from lftk.train.objective import FrozenParts, check_prediction_type, ip2p_loss, training_loss
from lftk import atomic
from lftk.train.rundir import RunDir

log = logging.getLogger(__name__)


@dataclass
class Setup:
    recipe: Recipe
    run: RunDir
    pipe: object
    parts: FrozenParts
    train_pairs: PairSet
    val_pairs: PairSet | None
    rank: int
    world: int
    future_pixels: bool = False  # aux losses compare decoded frames with the true future frame
    lora_modules: dict = field(default_factory=dict)  # component -> {layer name: ModuleLora}, for lftk_model.json
    teacher: object = None  # lftk.train.distill.Teacher when the recipe distils
    _datasets: dict = field(default_factory=dict)

    def datasets(self, resolution: int) -> tuple[PairDataset, PairDataset | None]:
        """(train, val) datasets at a resolution, with their latent caches; built once per resolution."""
        if resolution not in self._datasets:
            d = self.recipe.data
            made = []
            for split, pairs in ((d.train_split, self.train_pairs), (d.val_split, self.val_pairs)):
                ds = PairDataset(pairs, resolution, self.pipe.tokenizer, d.prompt_template) if pairs else None
                if ds is not None and self.recipe.train.cache_latents:
                    ds.latents = _latents(self, split, ds)
                if ds is not None:
                    colour = self.recipe.train.loss.colour_weight > 0  # needs both frames' pixels
                    ds.future_pixels = self.future_pixels or colour
                    ds.current_pixels = colour
                made.append(ds)
            self._datasets[resolution] = tuple(made)
        return self._datasets[resolution]


def setup(recipe: Recipe, resume: bool) -> Setup:
    from diffusers import DDPMScheduler

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    torch.manual_seed(recipe.seed)
    d = recipe.data
    train_pairs = PairSet(d.path, d.train_split)
    val_pairs = PairSet(d.path, d.val_split) if (Path(d.path) / d.val_split).is_dir() else None
    global_batch = recipe.train.batch_size * world
    if len(train_pairs) < global_batch:
        raise LftkError(
            f"{d.path}/{d.train_split}: {len(train_pairs)} training pairs, fewer than one batch of {global_batch} "
            "(lower train.batch_size or make more pairs)"
        )
    check_prompts(d.prompt_template, train_pairs, val_pairs)  # several horizons need {horizon} in the template
    pipe = load_pipeline(recipe.model.base, revision=recipe.model.revision)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    # Frozen parts only run forward: half precision on GPU halves their memory (no master copy needed).
    frozen_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(recipe.train.precision) if device.type == "cuda" else None
    trains_vae = recipe.train.vae_encoder_trains
    for frozen in (pipe.vae, pipe.text_encoder):
        frozen.requires_grad_(False).eval().to(device)
        # A VAE whose encoder carries adapters joins the engine, which sets its precision (and master weights).
        if frozen_dtype is not None and not (trains_vae and frozen is pipe.vae):
            frozen.to(dtype=frozen_dtype)
    parts = FrozenParts(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        null_ids=pipe.tokenizer("", padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids,
        scaling_factor=float(pipe.vae.config.scaling_factor),
        vae_scale=vae_scale_factor(pipe.vae),
        encoder_trains=trains_vae,
    )
    check_prediction_type(parts.noise_scheduler)  # before the run dir: a base we cannot train costs nothing
    teacher = None
    if recipe.distill is not None:  # the student samples with LCMScheduler: val metrics, tuning and final/ too
        from lftk.train.distill import load_teacher, student_scheduler

        pipe.scheduler = student_scheduler(pipe.scheduler.config, recipe.distill.solver_steps)
        teacher = load_teacher(recipe.distill, pipe, recipe.model.base, d.prompt_template, device,
                               frozen_dtype or torch.float32)
    if recipe.train.trainable == "lora":  # every part's patterns must match layers of this base
        from lftk.train.lora_parts import assign

        assign(recipe.train.lora, "unet", pipe.unet)
        if trains_vae:
            assign(recipe.train.lora, "vae_encoder", pipe.vae)
    run = RunDir(recipe.output_dir)  # created only once the inputs are known to be good
    if rank == 0:
        from lftk.eval.val import TensorBoardLog

        run.create(recipe, resume)
        run.tensorboard = TensorBoardLog(run.root)
    return Setup(recipe, run, pipe, parts, train_pairs, val_pairs or None, rank, world, teacher=teacher)


def _latents(s: Setup, split: str, dataset: PairDataset):
    from lftk.train import latent_cache

    root = Path(s.recipe.data.latent_cache or Path(s.recipe.data.path) / ".latents")
    path = latent_cache.cache_dir(root, s.pipe.vae, dataset.resolution, split)
    if s.rank == 0:
        latent_cache.build(dataset._pixels, dataset.items, s.pipe.vae, path)
    else:
        latent_cache.wait_for(path, dataset.items)
    return latent_cache.LatentArrays(path)


def check_finite(loss, step: int, rank: int, world: int) -> None:
    """Every rank learns whether any rank's loss is not finite, so all stop together before backward
    (one rank raising alone would leave the others waiting in the gradient all-reduce)."""
    value = loss.item()
    bad = [rank] if not math.isfinite(value) else []
    if world > 1:
        import torch.distributed as dist

        flags = torch.zeros(world, device=loss.device)
        flags[rank] = 0.0 if math.isfinite(value) else 1.0
        dist.all_reduce(flags)
        bad = [r for r in range(world) if flags[r] > 0]
    if bad:
        what = f"not finite on rank {', '.join(map(str, bad))}" if world > 1 else str(value)
        raise LftkError(f"loss is {what} at step {step}: stopping; the last good checkpoint is kept")


def total_steps(s: Setup) -> int:
    r = s.recipe
    if r.max_steps is not None:
        return r.max_steps
    global_batch = r.train.batch_size * r.train.grad_accum * s.world
    return max(1, len(s.train_pairs) // global_batch) * (r.train.epochs or 1)


def step_loss(unet, s: Setup, batch: dict, seed: int, dropout: float, aux=None):
    """(loss, {term: value}, decoded x0 or None, target or None): the recipe's objective on one batch,
    consistency distillation when it distils (lftk.train.distill), else the InstructPix2Pix loss."""
    if s.teacher is not None:
        from lftk.train.distill import distill_loss

        loss = distill_loss(unet, s.teacher, s.pipe.scheduler, s.parts, batch, s.recipe.distill, seed)
        return loss, {"consistency": loss.item()}, None, None
    if aux is None:
        return ip2p_loss(unet, s.parts, batch, dropout, seed), {}, None, None
    return training_loss(unet, s.parts, batch, dropout, seed, s.recipe.train.loss, aux)


@torch.no_grad()
def val_loss(unet, s: Setup, val_set: PairDataset | None, max_batches: int = 8) -> float | None:
    """Diffusion loss on the val split with fixed noise, so the figure is comparable across steps."""
    if val_set is None:
        return None
    unet.eval()
    bs = s.recipe.train.batch_size
    losses = []
    for start in range(0, min(len(val_set), bs * max_batches), bs):
        batch = default_collate([val_set[i] for i in range(start, min(start + bs, len(val_set)))])
        losses.append(step_loss(unet, s, batch, s.recipe.seed + 1, dropout=0.0)[0].item())
    unet.train()
    return sum(losses) / len(losses)


def _val_metrics(s: Setup, resolution: int) -> dict:
    """The evaluation metrics on a fixed small val subset (lftk eval's code), with the copy baseline."""
    t = s.recipe.train
    if not t.val_samples or not s.val_pairs:
        return {}
    if t.zero_stage == 3:  # weights are sharded across ranks: rank 0 alone cannot run the pipeline
        return {}
    from lftk.eval.val import val_metrics

    few = {"steps": s.recipe.distill.steps, "guidance": 1.0, "image_guidance": 1.0} if s.teacher is not None else {}
    return val_metrics(s.pipe, s.val_pairs, resolution, s.recipe.data.prompt_template,
                       max_samples=t.val_samples, seed=s.recipe.seed, with_copy=True, **few)


def _sampling_defaults(s: Setup, resolution: int) -> dict:
    """What final/lftk_model.json records under "sampling": the recipe's, or the best of its candidates."""

    cfg = s.recipe.sampling
    if s.teacher is not None:  # guidance is baked in: one branch at the student's steps; keep rules still tuned
        from lftk.train.distill import SCHEDULER

        cfg = cfg.model_copy(update={"steps": s.recipe.distill.steps, "guidance": [1.0], "image_guidance": [1.0]})
        return {**_tuned(s, cfg, resolution), "scheduler": SCHEDULER}
    return _tuned(s, cfg, resolution)


def _tuned(s: Setup, cfg, resolution: int) -> dict:
    from lftk.train.tune import tune_sampling, untuned

    if s.recipe.train.zero_stage == 3:  # sharded weights: rank 0 alone cannot run the pipeline
        return untuned(cfg, "ZeRO-3 shards the weights: run lftk eval with --guidance/--image-guidance to compare")
    return tune_sampling(s.pipe, s.val_pairs, resolution, s.recipe.data.prompt_template, cfg, s.recipe.seed, s.run.root)


def _save_final(engine, s: Setup, step: int, last_loss: float) -> None:
    if s.rank != 0:
        return
    sampling = _sampling_defaults(s, s.recipe.train.resolution)
    tmp = atomic.staging_dir(s.run.final)
    from lftk.train.lora import split_trained

    unet, vae = split_trained(engine.module)
    lora_meta = None
    if s.recipe.train.trainable == "lora":
        from lftk.train.lora import lora_summary, merged_copy, save_lora

        cfg = s.recipe.train.lora
        lora_meta = {**cfg.model_dump(), "resolved_parts": lora_summary(cfg, s.lora_modules, {"unet": unet, "vae_encoder": vae})}
        save_lora(unet, cfg, tmp / "lora", vae=vae)
        unet = merged_copy(unet)
        if vae is not None:  # the encoder's adapters folded in: stock from_pretrained and `lftk export` read it
            s.pipe.vae = merged_copy(vae)
    s.pipe.unet = unet
    s.pipe.save_pretrained(str(tmp))
    base_meta = read_meta(Path(s.recipe.model.base)) if Path(s.recipe.model.base).is_dir() else {}
    horizons = s.train_pairs.horizons()  # what the model was trained on, from the pairs themselves
    write_meta(
        tmp,
        {
            **base_meta,
            "base": s.recipe.model.base,
            "trainable": s.recipe.train.trainable,
            "resolution": s.recipe.train.resolution,
            "prompt_template": s.recipe.data.prompt_template,
            "horizon": horizons[0] if len(horizons) == 1 else None,
            "horizons": horizons,
            "steps": step,
            "final_loss": last_loss,
            "precision": s.recipe.train.precision,
            "lora": lora_meta,
            "sampling": sampling,
            "distilled": None if s.teacher is None else s.teacher.record(s.recipe.distill, s.recipe.distill.steps),
        },
    )
    atomic.swap_in(tmp, s.run.final)


def _micro_batches(s: Setup, step: int, steps: int):
    """Endless micro batches from `step` on; a new loader whenever the resolution stage changes."""
    t = s.recipe.train
    while True:
        res = t.resolution_at(step, steps)
        train_set, _ = s.datasets(res)
        loader = make_loader(train_set, t.batch_size, t.grad_accum, s.rank, s.world, s.recipe.seed, step * t.grad_accum, s.recipe.data.num_workers)
        log.info("training at %d px from step %d", res, step)
        # A DataLoader iterator draws its base seed from the global torch RNG, which also drives LoRA dropout:
        # a resumed run starts its iterator at another point of that stream, so keep the draw out of it.
        rng = torch.get_rng_state()
        batches = iter(loader)
        torch.set_rng_state(rng)
        for i, batch in enumerate(batches):
            yield batch
            if (i + 1) % t.grad_accum == 0:
                step += 1
                if step >= steps or t.resolution_at(step, steps) != res:
                    break
        if step >= steps:
            return


def train(recipe: Recipe, resume: bool = False, trust_checkpoint: bool = False) -> RunDir:
    s = setup(recipe, resume)
    t = recipe.train
    unet = model = s.pipe.unet
    if t.trainable == "lora":
        from lftk.train.lora import UnetAndVae, add_lora, add_vae_lora

        s.lora_modules["unet"] = add_lora(unet, t.lora)
        if t.vae_encoder_trains:
            s.lora_modules["vae_encoder"] = add_vae_lora(s.pipe.vae, t.lora)
            model = UnetAndVae(unet, s.pipe.vae)  # one engine: DeepSpeed steps and checkpoints both
    if t.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    model.train()
    try:
        return _train(s, model, trust_checkpoint, resume)
    except Exception as exc:  # a lost or hung rank surfaces as a backend error in whichever collective waits on it
        lost = lost_peer_error(exc, s)
        if lost is None:
            raise
        raise lost from exc


DIST_ERROR_MARKS = ("connection closed by peer", "connection reset by peer", "connection refused", "timed out", "broken pipe")


def lost_peer_error(exc: BaseException, s: Setup) -> LftkError | None:
    """An LftkError naming what was lost and the newest complete checkpoint, when `exc` is a
    torch.distributed failure in a multi-rank run; None for anything else (a bug stays a traceback)."""
    if s.world <= 1 or isinstance(exc, LftkError):
        return None
    import torch.distributed as dist

    text = _backend_reason(str(exc))
    dist_error = isinstance(exc, getattr(dist, "DistError", ())) or (
        isinstance(exc, RuntimeError) and any(mark in text.lower() for mark in DIST_ERROR_MARKS)
    )
    if not dist_error:
        return None
    return LftkError(lost_message(s, text))


def lost_message(s: Setup, detail: str) -> str:
    tags = checkpoint.complete_tags(s.run.checkpoints)
    kept = f"the newest complete checkpoint is {s.run.checkpoints / tags[-1]}" if tags else "no checkpoint is complete yet"
    return f"rank {s.rank} of {s.world} lost contact with another rank ({detail}); {kept}: start every node again with --resume"


def _watchdog(s: Setup):
    """Watchdog.watch for a multi-rank run (gloo may block past its timeout), else a no-op."""
    from lftk.train import watchdog

    if s.world <= 1:
        return watchdog.nothing
    timeout = s.recipe.train.dist_timeout_s
    return watchdog.Watchdog(
        timeout, lambda what: lost_message(s, f"no answer for {timeout:g} s in {what}: train.dist_timeout_s")
    ).watch


def _backend_reason(message: str) -> str:
    """The informative part of a gloo/NCCL error: "Read error [10.0.0.2]:4711: Connection reset by peer",
    without the source location, the advice that follows it, or more than 300 characters."""
    import re

    text = " ".join(message.split())
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", text)  # [../gloo/transport/tcp/pair.cc:537]
    text = text.split(". This is typically", 1)[0]
    return text if len(text) <= 300 else text[:297] + "..."


def _train(s: Setup, model, trust_checkpoint: bool, resume: bool) -> RunDir:
    recipe, t = s.recipe, s.recipe.train
    steps = total_steps(s)
    engine, _ = setup_engine(model, recipe, steps)
    aux = AuxLosses(t.loss.perceptual, t.loss.adversarial, t.loss.perceptual_weights, t.loss.disc_lr, engine.device)
    s.future_pixels = aux.active
    step = checkpoint.load(engine, s.run.checkpoints, aux, trust=trust_checkpoint) if resume else 0
    if resume and s.rank == 0:
        s.run.truncate_metrics(step)
    t0, last = time.perf_counter(), float("nan")
    micro = _micro_batches(s, step, steps)
    watch = _watchdog(s)
    with progress_bar("train", total=steps, completed=step, enabled=s.rank == 0) as advance:
        while step < steps:
            for _ in range(t.grad_accum):
                loss, terms, decoded, target = step_loss(engine, s, next(micro), recipe.seed, t.conditioning_dropout, aux)
                with watch(f"step {step + 1}'s collectives"):
                    check_finite(loss, step, s.rank, s.world)
                    engine.backward(loss)
                    engine.step()
                if decoded is not None:
                    terms["disc"] = aux.discriminator_step(decoded, target)
            step += 1
            last = loss.item()
            advance(1)
            if s.rank == 0 and (step % t.log_every == 0 or step == steps):
                extra = {k: v for k, v in terms.items() if k != "diffusion" and v is not None} if len(terms) > 1 else {}
                s.run.log_metrics({"step": step, "loss": last, **extra, "lr": engine.get_lr()[0],
                                   "resolution": t.resolution_at(step - 1, steps), "elapsed_s": round(time.perf_counter() - t0, 2)})
            at_checkpoint = (t.checkpoint_every and step % t.checkpoint_every == 0) or step == steps
            if (t.val_every and step % t.val_every == 0) or at_checkpoint:
                vl = val_loss(engine.module, s, s.datasets(t.resolution_at(step - 1, steps))[1])
                if vl is not None and not math.isfinite(vl):  # every rank sees the same: all stop together
                    raise LftkError(
                        f"validation loss is {vl} at step {step}: the weights have diverged; stopping before they are "
                        "saved (checkpoints written so far are kept)"
                    )
                if s.rank == 0 and vl is not None:
                    s.run.log_metrics({"step": step, "val_loss": vl, **_val_metrics(s, t.resolution_at(step - 1, steps))})
            if at_checkpoint:
                with watch(f"the checkpoint of step {step}"):
                    checkpoint.save(engine, s.run.checkpoints, step, s.rank, t.keep_checkpoints, aux)
    _save_final(engine, s, step, last)
    if s.rank == 0:
        from lftk.eval.val import plot_val_metrics

        s.run.plot_loss()
        plot_val_metrics(s.run.read_metrics(), s.run.root / "val_metrics.png")
        log.info("trained %d steps in %.0f s; final model: %s", step, time.perf_counter() - t0, s.run.final)
    return s.run
