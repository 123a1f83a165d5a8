"""Latent consistency distillation of a trained InstructPix2Pix teacher into a few-step student.

The method of latent consistency models (Luo et al. 2023), written for InstructPix2Pix's three
guidance branches, which the text-to-image recipes do not have. Each training sample:

1. a future-frame latent x0 is noised to x_t at a timestep t of the teacher's DDIM grid
   (`solver_steps` points: t = k-1, 2k-1, ..., T-1 with k = T / solver_steps);
2. the teacher takes one guided DDIM step from x_t to x_{t-k}: its UNet runs on the three branches
   (text and image, image only, neither) and combines them with the baked-in scales as the
   pipeline does, ε = ε_∅ + s_I·(ε_I - ε_∅) + s_T·(ε_TI - ε_I);
3. the student, conditioned on text and image only (one call), maps x_t to a clean latent through
   the consistency parameterisation f(x, t) = c_skip(t)·x + c_out(t)·x0_pred(x, t) (LCMScheduler's
   boundary scalings), and is pulled towards f(x_{t-k}, t-k) of itself with gradients stopped;
4. with `data_weight` > 0, f(x_t, t) is also pulled towards x0 itself, the frame the camera saw: the
   teacher is only a model of the future. On the CPU demo, distillation alone left the 2-step
   student 1.2 dB of PSNR and 2.6 px of hand error behind its teacher on 24 val pairs; with weight 3
   it is ahead of the teacher on the test split (recipes/demo-distill.yaml lists the sweep).

The target is the student itself rather than an EMA copy (as LCM-LoRA and improved consistency
training do): nothing but the engine's own state needs checkpointing, so resume stays exact.
All draws come from `SampleNoise` (seeded per sample key), so 2 ranks equal 1 rank here too.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lftk.errors import LftkError
from lftk.model.components import LATENT_CHANNELS
from lftk.runtime.params import SamplingParams
from lftk.train.aux_losses import x0_estimate
from lftk.train.objective import FrozenParts, SampleNoise, clean_latents

log = logging.getLogger(__name__)

METHOD = "latent consistency distillation"
SCHEDULER = "lcm"  # lftk.runtime.sampler.SCHEDULERS key of diffusers' LCMScheduler
SHARED = ("vae", "text_encoder")  # components the teacher's branches and the student's run through, once
_IGNORED_CONFIG = {"_name_or_path", "_diffusers_version", "transformers_version", "_commit_hash"}


@dataclass
class Teacher:
    unet: torch.nn.Module
    guidance: float
    image_guidance: float
    pipeline_dir: Path
    sampling: dict  # the teacher's own recorded sampling (what it is compared at)
    grid: torch.Tensor  # (solver_steps,) the DDIM timesteps, ascending
    skip: int  # k: timesteps per grid step

    def record(self, cfg, steps: int) -> dict:
        """lftk_model.json's "distilled" entry of the student."""
        return {
            "method": METHOD,
            "teacher": str(self.pipeline_dir),
            "teacher_sampling": self.sampling,
            "guidance": [self.guidance, self.image_guidance],
            "steps": steps,
            "solver_steps": cfg.solver_steps,
            "data_weight": cfg.data_weight,
            "scheduler": SCHEDULER,
        }


def _config(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LftkError(f"{path}: cannot read ({exc})") from exc
    return {k: v for k, v in data.items() if k not in _IGNORED_CONFIG}


def load_teacher(cfg, student_pipe, student_dir: str, prompt_template: str, device, dtype) -> Teacher:
    """The teacher's UNet (frozen, eval mode, on `device`), its guidance scales and DDIM grid.
    The student's VAE and text encoder serve both: they must be the teacher's (same configs)."""
    from diffusers import UNet2DConditionModel

    from lftk.model.base import read_meta
    from lftk.model.resolve import resolve_model

    ref = resolve_model(cfg.teacher)
    if ref.pipeline_dir is None:
        raise LftkError(f"distill.teacher: {cfg.teacher} holds no diffusers pipeline")
    teacher_dir = Path(ref.pipeline_dir)
    student_dir = Path(student_dir)
    if student_dir.is_dir():
        for part in SHARED:
            name = "config.json"
            a, b = _config(teacher_dir / part / name), _config(student_dir / part / name)
            if a != b:
                raise LftkError(f"distill.teacher: {teacher_dir / part} differs from model.base's {student_dir / part}: "
                                "teacher and student must share the VAE and the text encoder")
    meta = read_meta(teacher_dir)
    if meta.get("distilled"):
        raise LftkError(f"distill.teacher: {teacher_dir} is itself a distilled student: distil its teacher instead")
    trained_on = meta.get("prompt_template")
    if trained_on and trained_on != prompt_template:
        raise LftkError(f"distill.teacher was trained with data.prompt_template {trained_on!r}, this recipe says "
                        f"{prompt_template!r}: the teacher must be asked what it was trained on")
    sampling = SamplingParams.for_model(meta)
    guidance, image_guidance = cfg.guidance or (sampling.guidance, sampling.image_guidance)
    unet = UNet2DConditionModel.from_pretrained(str(teacher_dir / "unet"))
    if unet.config.in_channels != student_pipe.unet.config.in_channels:
        raise LftkError(f"distill.teacher: its UNet takes {unet.config.in_channels} channels, the student's "
                        f"{student_pipe.unet.config.in_channels}")
    unet.requires_grad_(False).eval().to(device, dtype=dtype)
    total = int(student_pipe.scheduler.config.num_train_timesteps)
    if total % cfg.solver_steps:
        raise LftkError(f"distill.solver_steps {cfg.solver_steps} must divide the {total} training timesteps")
    skip = total // cfg.solver_steps
    grid = torch.arange(1, cfg.solver_steps + 1) * skip - 1
    log.info("distilling %s (guidance %g / image %g, %d-step DDIM grid)", teacher_dir, guidance, image_guidance,
             cfg.solver_steps)
    return Teacher(unet, float(guidance), float(image_guidance), teacher_dir, sampling.to_dict(), grid, skip)


def student_scheduler(config, solver_steps: int):
    """The student's diffusers LCMScheduler, from the teacher's scheduler config and DDIM grid."""
    from diffusers import LCMScheduler

    return LCMScheduler.from_config(dict(config), original_inference_steps=solver_steps, clip_sample=False)


def _boundary(scheduler, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) per sample, (B, 1, 1, 1): LCMScheduler's own, so training and sampling agree."""
    pairs = [scheduler.get_scalings_for_boundary_condition_discrete(int(t)) for t in steps.tolist()]
    c_skip = torch.tensor([float(a) for a, _ in pairs]).view(-1, 1, 1, 1)
    c_out = torch.tensor([float(b) for _, b in pairs]).view(-1, 1, 1, 1)
    return c_skip.to(steps.device), c_out.to(steps.device)


def _noise_estimate(scheduler, noisy: torch.Tensor, out: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    if scheduler.config.prediction_type == "v_prediction":
        alpha_bar = scheduler.alphas_cumprod.to(noisy.device)[steps].float().view(-1, 1, 1, 1)
        return alpha_bar.sqrt() * out + (1 - alpha_bar).sqrt() * noisy
    return out


def consistency(unet, x: torch.Tensor, steps: torch.Tensor, image, text, train_sched, lcm) -> torch.Tensor:
    """f(x, t): the student's clean-latent estimate under the consistency boundary condition."""
    dtype = next(unet.parameters()).dtype
    out = unet(torch.cat([x, image], dim=1).to(dtype), steps, text.to(dtype)).sample.float()
    x0, _ = x0_estimate(train_sched, x, out, steps)
    c_skip, c_out = _boundary(lcm, steps)
    return c_skip * x + c_out * x0


@torch.no_grad()
def teacher_step(teacher: Teacher, x: torch.Tensor, steps: torch.Tensor, prev: torch.Tensor, image, text, null_text,
                 sched) -> torch.Tensor:
    """One guided DDIM step of the teacher from x at `steps` to `prev`: the three InstructPix2Pix branches
    (text and image, image only, neither) in one call, combined with the baked-in scales."""
    from lftk.runtime.sampler import guided, uses_cfg

    dtype = next(teacher.unet.parameters()).dtype
    if uses_cfg(teacher.guidance, teacher.image_guidance):
        n = x.shape[0]
        model_in = torch.cat([torch.cat([x, image], 1), torch.cat([x, image], 1), torch.cat([x, torch.zeros_like(image)], 1)])
        embeds = torch.cat([text, null_text, null_text])
        out = teacher.unet(model_in.to(dtype), steps.repeat(3), embeds.to(dtype)).sample.float()
        out = guided(out[:n], out[n : 2 * n], out[2 * n :], teacher.guidance, teacher.image_guidance)
    else:  # the pipeline's switch: at these scales guidance is the text-and-image branch alone
        out = teacher.unet(torch.cat([x, image], 1).to(dtype), steps, text.to(dtype)).sample.float()
    x0, _ = x0_estimate(sched, x, out, steps)
    eps = _noise_estimate(sched, x, out, steps)
    alpha_prev = sched.alphas_cumprod.to(x.device)[prev].float().view(-1, 1, 1, 1)
    return alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps


def distill_loss(unet, teacher: Teacher, lcm, parts: FrozenParts, batch: dict, cfg, seed: int) -> torch.Tensor:
    """The consistency distillation loss of one batch (see the module docstring)."""
    device = next(unet.parameters()).device
    sched = parts.noise_scheduler
    if "fut_mean" in batch:
        latent_shape = tuple(batch["fut_mean"].shape[1:])
    else:
        latent_shape = (LATENT_CHANNELS, *(s // parts.vae_scale for s in batch["future"].shape[-2:]))
    draws = SampleNoise.draw(seed, batch["key"], latent_shape, len(teacher.grid))  # timesteps: grid indices
    latents, image = clean_latents(parts, batch, draws, device)
    index = draws.timesteps
    steps = teacher.grid[index].to(device)
    prev = torch.clamp(steps - teacher.skip, min=0)
    noisy = sched.add_noise(latents, draws.noise.to(device), steps)
    text = parts.encode_text(batch["input_ids"].to(device))
    null_text = parts.encode_text(parts.null_ids.to(device)).expand_as(text)

    pred = consistency(unet, noisy, steps, image, text, sched, lcm)
    x_prev = teacher_step(teacher, noisy, steps, prev, image, text, null_text, sched)
    with torch.no_grad():
        target = consistency(unet, x_prev, prev, image, text, sched, lcm)
    loss = _distance(pred, target, cfg)
    if cfg.data_weight:
        loss = loss + cfg.data_weight * _distance(pred, latents, cfg)
    return loss


def _distance(a: torch.Tensor, b: torch.Tensor, cfg) -> torch.Tensor:
    if cfg.loss == "l2":
        return F.mse_loss(a, b)
    c = cfg.huber_c
    return (torch.sqrt((a - b) ** 2 + c**2) - c).mean()
