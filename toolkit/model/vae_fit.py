"""Fit a small AutoencoderKL to simulated frames, so the tiny preset's latents mean something.

Reconstruction (L1 + MSE) plus a light KL term, as in the LDM autoencoder recipe minus the
adversarial part; then `scaling_factor` is set to 1/std of the latents, which is how SD's 0.18215
was chosen.

What a robot frame is about is small: a 4 px block on a 64 px frame is 0.4% of the pixels, and a
plain reconstruction loss is lowest when such blocks are blurred into the table (a VAE fitted that
way loses most of them, and no UNet can draw what its VAE cannot). So saturated pixels
(lftk.model.colour) weigh 1 + `colour_weight` in the loss: the blocks, the target pad and the
hammer survive, at little cost to the grey arms and the table.

With a KL weight this light, the posterior's spread is whatever the fit left it: on simulated frames
its std came out at 20-90% of the latents' own (a 2x-downsampling VAE: 0.58 against 0.64), so a UNet
trained on posterior samples (as diffusers' training scripts draw them) spends much of its loss on
noise it cannot predict. After the fit the posterior is pinned to its mean (the log-variance output of
`quant_conv` set to a constant, std ~3e-7): `latent_dist.sample()` then returns the mean, in lftk's
training and in stock diffusers code alike. The fitted spread is kept in the figures.

The fit reports its figures on frames it never saw (held-out episodes): PSNR, and, where the
frames come from the simulator (episode.json with states), the share of objects that the object
scorer of `lftk eval` no longer finds in the reconstruction.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from lftk.data.images import load_rgb
from lftk.data.inspect import spread_indices
from lftk.model.colour import CHROMA_THRESHOLD, chroma_mask, normalised_weights
from lftk.errors import LftkError
from lftk.runtime.pixels import images_to_model, model_to_uint8

log = logging.getLogger(__name__)

HELDOUT_EVERY = 10  # in an episodes dir, every 10th episode (sorted) is kept out of the fit for its figures
HELDOUT_FRAMES = 200  # at most this many held-out frames are scored (spread over them)


@dataclass(frozen=True)
class VaeFitSpec:
    """How a preset's VAE is fitted (presets carry the numbers; `lftk init-base` options override)."""

    steps: int = 1000
    resolution: int = 64
    batch_size: int = 8
    lr: float = 2e-3
    kl_weight: float = 1e-6
    colour_weight: float = 20.0  # saturated pixels weigh 1 + this; 0 = plain L1 + MSE
    colour_threshold: float = CHROMA_THRESHOLD  # chroma (max - min channel, 0..1) above which a pixel is coloured
    max_frames: int = 2000


@dataclass(frozen=True)
class FrameRef:
    """One frame to fit on or score: its file and, for simulated data, where its states are."""

    path: Path
    episode_dir: Path | None = None
    frame: int | None = None


def collect_frames(root: Path) -> tuple[list[FrameRef], list[FrameRef], str]:
    """(frames to fit on, held-out frames to report on, how they were split) from `root`:

    - a pair dir (OUT/<split>/<sample>/, from `lftk data pairs`): fit on the train split's frames,
      report on the val split's, so no frame of a test episode is ever seen;
    - an episodes dir (OUT/<task>/episode<k>/): every HELDOUT_EVERY-th episode is held out;
    - any other dir of .jpg/.png frames: all are fitted on, and the figures are on fitted frames.
    """
    from lftk.data.pairset import split_names

    root = Path(root)
    if not root.is_dir():
        raise LftkError(f"--frames {root}: not a directory")
    splits = [s for s in split_names(root) if next((root / s).glob("*/prompt.json"), None) is not None]
    if splits:  # sample dirs with prompt.json under split dirs: a pair dir
        if "train" not in splits:
            raise LftkError(f"--frames {root}: a pair dir without a train split (splits: {', '.join(splits)})")
        held = _pair_frames(root, "val") if "val" in splits else []
        return _pair_frames(root, "train"), held, "pair dir: fit on train, report on val" if held else "pair dir without val"
    from lftk.data.episodes import list_episodes

    episodes = list_episodes(root)
    if episodes:
        held_ids = {i for i in range(len(episodes)) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1}
        if len(episodes) > 1 and not held_ids:
            held_ids = {len(episodes) - 1}
        fit, held = [], []
        for i, ep in enumerate(episodes):
            refs = [FrameRef(p, ep.path, k) for k, p in enumerate(ep.frame_paths)]
            (held if i in held_ids else fit).extend(refs)
        return fit, held, f"episodes dir: {len(held_ids)} of {len(episodes)} episodes held out"
    frames = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not frames:
        raise LftkError(f"--frames {root}: no .jpg/.png frames found")
    return [FrameRef(p) for p in frames], [], "plain frames: nothing held out"


def _pair_frames(root: Path, split: str) -> list[FrameRef]:
    """Both frames of every pair, once each (the future of one pair is often the current of another)."""
    from lftk.data.pairset import PairSet

    seen: dict[tuple, FrameRef] = {}
    for pair in PairSet(root, split):
        src = pair.prompt.get("source_episode_dir")
        for path, key in ((pair.current, "frame"), (pair.future, "future_frame")):
            frame = pair.prompt.get(key)
            ident = (src, frame) if src is not None and frame is not None else (str(path),)
            seen.setdefault(ident, FrameRef(path, Path(src) if src else None, frame))
    return list(seen.values())


def _sample(refs: Sequence[FrameRef], limit: int, rng: np.random.Generator) -> list[FrameRef]:
    """At most `limit` of `refs`, drawn at random (in their order) from `rng`."""
    if len(refs) <= limit:
        return list(refs)
    return [refs[i] for i in sorted(rng.choice(len(refs), limit, replace=False))]


def _spread(refs: Sequence[FrameRef], limit: int) -> list[FrameRef]:
    """At most `limit` of `refs`, evenly spaced: every task and episode is in the figures."""
    return [refs[i] for i in spread_indices(len(refs), limit)]


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, spec: VaeFitSpec) -> torch.Tensor:
    err = rec - x
    if spec.colour_weight <= 0:
        return err.abs().mean() + err.pow(2).mean()
    w = normalised_weights(chroma_mask(x, spec.colour_threshold), spec.colour_weight)  # (B, 1, H, W)
    return (err.abs() * w).mean() + (err.pow(2) * w).mean()


@torch.no_grad()
def reconstruct(vae, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """(N, H, W, 3) uint8 through the VAE (posterior mean) and back, as uint8."""
    out = []
    for start in range(0, len(images), batch_size):
        x = images_to_model(images[start : start + batch_size])
        out.append(model_to_uint8(vae.decode(vae.encode(x).latent_dist.mean).sample))
    return np.concatenate(out)


def score_reconstructions(vae, refs: Sequence[FrameRef], resolution: int) -> dict:
    """PSNR of the reconstructions, and the share of objects they lose (simulated frames only)."""
    from lftk.eval.metrics import psnr
    from lftk.eval.trajectory import episode_meta, trajectory_target

    images = np.stack([load_rgb(r.path, resolution) for r in refs])
    recs = reconstruct(vae, images)
    psnrs, missing = [], []
    for ref, img, rec in zip(refs, images, recs):
        psnrs.append(psnr(rec, img)[0])
        if ref.episode_dir is None or ref.frame is None:
            continue
        meta, _ = episode_meta({"source_episode_dir": str(ref.episode_dir)})
        target, _ = trajectory_target(img, meta, ref.frame, ref.frame) if meta else (None, "")
        if target is not None and target.truth_xy:
            missing.append(target.score(rec)[0]["obj_missing"])
    return {
        "frames": len(refs),
        "recon_psnr_db": round(float(np.mean(psnrs)), 2),
        "objects_missing": round(float(np.mean(missing)), 3) if missing else None,
        "frames_with_objects": len(missing),
    }


PINNED_LOGVAR = -30.0  # diffusers clamps the log-variance to [-30, 20]: std exp(-15) ~ 3e-7


@torch.no_grad()
def pin_posterior(vae) -> None:
    """Make `vae`'s posterior its mean: the log-variance half of `quant_conv` outputs PINNED_LOGVAR."""
    conv = vae.quant_conv
    if conv is None:
        raise LftkError("this VAE has no quant_conv (use_quant_conv: false): its posterior cannot be pinned")
    half = conv.out_channels // 2
    conv.weight[half:] = 0.0
    conv.bias[half:] = PINNED_LOGVAR


def fit_vae(vae, frames: Sequence[FrameRef], spec: VaeFitSpec, heldout: Sequence[FrameRef] = (), seed: int = 0) -> dict:
    """Train `vae` in place on `frames`; returns the fit's figures (on `heldout` when given)."""
    rng = np.random.default_rng(seed)
    picks = _sample(frames, spec.max_frames, rng)
    data = images_to_model(np.stack([load_rgb(r.path, spec.resolution) for r in picks]))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(vae.parameters(), lr=spec.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.steps, pct_start=0.1)
    vae.train()
    t0 = time.perf_counter()
    for step in range(spec.steps):
        idx = torch.randint(len(data), (min(spec.batch_size, len(data)),), generator=gen)
        x = data[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = reconstruction_loss(rec, x, spec) + spec.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            log.info("vae fit step %d/%d loss %.4f", step, spec.steps, loss.item())
    fit_s = time.perf_counter() - t0
    vae.eval()
    with torch.no_grad():
        fitted = vae.encode(data[: min(64, len(data))]).latent_dist
        std, spread = float(fitted.mean.std()), float(fitted.std.mean())
    pin_posterior(vae)
    vae.register_to_config(scaling_factor=1.0 / std)
    scored = _spread(heldout, HELDOUT_FRAMES) if heldout else _spread(picks, HELDOUT_FRAMES)
    figures = score_reconstructions(vae, scored, spec.resolution)
    stats = {
        **asdict(spec),
        "fit_frames": len(picks),
        "fit_seconds": round(fit_s, 1),
        "latent_std": round(std, 4),
        "posterior_std_fitted": round(spread, 4),
        "posterior": "pinned to its mean",
        "scored_on": "held-out frames" if heldout else "fitted frames (nothing held out)",
        **figures,
    }
    log.info(
        "vae fit: %d steps in %.0f s; on %d %s: reconstruction PSNR %.1f dB, objects missing %s",
        spec.steps, fit_s, figures["frames"], stats["scored_on"], figures["recon_psnr_db"],
        "n/a" if figures["objects_missing"] is None else f"{figures['objects_missing']:.2f}",
    )
    return stats
