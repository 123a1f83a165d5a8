"""Fit a small AutoencoderKL to simulated frames, so the tiny preset's latents mean something.

Reconstruction (L1 + MSE) plus a light KL term, as in the LDM autoencoder recipe minus the
adversarial part; then `scaling_factor` is set to 1/std of the latents, which is how SD's 0.18215
was chosen.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lftk.data.images import load_rgb

log = logging.getLogger(__name__)


def _load_stack(frames: Sequence[Path], resolution: int, limit: int, rng: np.random.Generator) -> torch.Tensor:
    paths = list(frames)
    if len(paths) > limit:
        paths = [paths[i] for i in sorted(rng.choice(len(paths), limit, replace=False))]
    arr = np.stack([load_rgb(p, resolution) for p in paths])  # (N, H, W, 3) uint8
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (N, 3, H, W) in [-1, 1]


def fit_vae(
    vae,
    frames: Sequence[Path],
    steps: int = 400,
    resolution: int = 64,
    batch_size: int = 8,
    lr: float = 2e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
    max_frames: int = 2000,
) -> dict:
    """Train `vae` in place; returns figures of the fit (PSNR of reconstructions, latent std)."""
    rng = np.random.default_rng(seed)
    data = _load_stack(frames, resolution, max_frames, rng)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    vae.train()
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(data), (min(batch_size, len(data)),), generator=gen)
        x = data[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            log.info("vae fit step %d/%d loss %.4f", step, steps, loss.item())
    vae.eval()
    with torch.no_grad():
        probe = data[: min(64, len(data))]
        z = vae.encode(probe).latent_dist.mean
        rec = vae.decode(z).sample.clamp(-1, 1)
        mse = F.mse_loss((rec + 1) / 2, (probe + 1) / 2).item()
    std = float(z.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    psnr = 10 * math.log10(1.0 / max(mse, 1e-12))
    log.info("vae fit: %d steps in %.0f s, reconstruction PSNR %.1f dB", steps, time.perf_counter() - t0, psnr)
    return {"steps": steps, "frames": len(data), "recon_psnr_db": round(psnr, 2), "latent_std": round(std, 4)}
