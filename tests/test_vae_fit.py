"""The tiny VAE fit keeps what a robot frame is about: a small block of saturated colour survives
the autoencoder (a plain reconstruction loss blurs it into the table), the frames it is scored on
are held out, and `lftk init-base` reports and records the figures."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lftk.eval.trajectory import COLOUR_TOLERANCE
from lftk.model.components import build_components, preset_spec
from lftk.model.vae_fit import FrameRef, collect_frames, fit_vae, pin_posterior, reconstruct

RES, BLOCK, STEPS = 32, 3, 250  # a 3 px block on a 32 px frame: 0.9% of the pixels, like a block at 64 px
TABLE, ARM, GREEN = (165, 135, 110), 230, np.array([40, 170, 50])


def _scene(rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int]]:
    """A table, two grey arm blobs and one green block; (frame, block's top-left (x, y))."""
    img = np.tile(np.array(TABLE, float), (RES, RES, 1))
    yy, xx = np.mgrid[:RES, :RES]
    for _ in range(2):
        cx, cy = rng.integers(0, RES, 2)
        r = rng.integers(RES // 8, RES // 4)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = ARM
    x, y = (int(v) for v in rng.integers(2, RES - BLOCK - 2, 2))
    img[y : y + BLOCK, x : x + BLOCK] = GREEN
    return np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8), (x, y)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> tuple[list[FrameRef], list[FrameRef], list[tuple[int, int]]]:
    root = tmp_path_factory.mktemp("scenes")
    rng = np.random.default_rng(0)
    refs, boxes = [], []
    for i in range(64):
        frame, box = _scene(rng)
        Image.fromarray(frame).save(root / f"{i}.png")
        refs.append(FrameRef(root / f"{i}.png"))
        boxes.append(box)
    return refs[:48], refs[48:], boxes[48:]


def _block_colour_error(vae, held: list[FrameRef], boxes) -> float:
    """Mean distance (uint8 RGB) between the block's colour and what the reconstruction shows there."""
    frames = np.stack([np.asarray(Image.open(r.path).convert("RGB")) for r in held])
    recs = reconstruct(vae, frames)
    return float(np.mean([
        np.linalg.norm(rec[y : y + BLOCK, x : x + BLOCK].reshape(-1, 3).mean(axis=0) - GREEN)
        for rec, (x, y) in zip(recs, boxes)
    ]))


def test_the_fit_keeps_a_small_coloured_block(scenes):
    """The tiny preset's fit (shortened) keeps the block's colour on held-out frames, well inside the
    object scorer's tolerance; the same fit without colour weighting loses it, so this test can fail."""
    fit, held, boxes = scenes
    spec = replace(preset_spec("tiny").vae_fit, steps=STEPS, resolution=RES)
    errors = {}
    for weight in (spec.colour_weight, 0.0):
        vae = build_components("tiny", seed=0)["vae"]
        stats = fit_vae(vae, fit, replace(spec, colour_weight=weight), heldout=held)
        assert stats["scored_on"] == "held-out frames" and stats["frames"] == len(held)
        errors[weight] = _block_colour_error(vae, held, boxes)
    assert errors[spec.colour_weight] < COLOUR_TOLERANCE / 2, errors
    assert errors[0.0] > COLOUR_TOLERANCE, errors  # the control: plain L1 + MSE blurs the block away


def _pair_dir(root: Path) -> Path:
    for split, episodes in (("train", (0, 1)), ("val", (2,))):
        for ep in episodes:
            for frame in (0, 10):
                d = root / split / f"task__episode{ep}__f{frame:04d}"
                d.mkdir(parents=True)
                for k in (0, 1):
                    Image.new("RGB", (RES, RES), (ep * 40, frame, k * 90)).save(d / f"000000_{k}.jpg")
                prompt = {"instruction": "stack", "source_episode_dir": f"/eps/task/episode{ep}",
                          "frame": frame, "future_frame": frame + 10}
                (d / "prompt.json").write_text(json.dumps(prompt))
    return root


def test_collect_frames_holds_out_val_pairs_and_every_tenth_episode(tmp_path):
    fit, held, how = collect_frames(_pair_dir(tmp_path / "pairs"))
    # frames 0, 10, 20 of episodes 0 and 1 (the future of f0000 is the current of f0010, counted once)
    assert sorted((r.episode_dir.name, r.frame) for r in fit) == [(f"episode{e}", f) for e in (0, 1) for f in (0, 10, 20)]
    assert {r.episode_dir.name for r in held} == {"episode2"} and "val" in how

    eps = tmp_path / "episodes" / "task"
    for k in range(12):
        (eps / f"episode{k}").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (RES, RES), (k, i, 0)).save(eps / f"episode{k}" / f"{i}.jpg")
        (eps / f"episode{k}" / "episode.json").write_text(json.dumps({"instruction": "stack"}))
    fit, held, _ = collect_frames(tmp_path / "episodes")
    assert {r.episode_dir.name for r in held} == {"episode9"}
    assert len(fit) == 11 * 3 and all(r.frame in (0, 1, 2) for r in fit)


def test_init_base_reports_and_records_the_fit(tmp_path, capsys):
    from lftk.cli import app
    from lftk.model.base import read_meta

    pairs = _pair_dir(tmp_path / "pairs")
    out = tmp_path / "base"
    with pytest.raises(SystemExit) as exit_info:
        app(["init-base", str(out), "--preset", "tiny", "--frames", str(pairs), "--vae-steps", "3"], standalone_mode=True)
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    fit = read_meta(out)["vae_fit"]
    assert fit["steps"] == 3 and fit["frames"] == 3 and fit["scored_on"] == "held-out frames"
    assert f"reconstruction PSNR {fit['recon_psnr_db']:.2f} dB" in printed
    assert fit["objects_missing"] is None and "objects missing n/a" in printed  # no simulator states here


def test_pinning_the_posterior_keeps_its_mean_and_drops_its_spread():
    import torch

    vae = build_components("tiny", seed=0)["vae"].eval()
    x = torch.rand(2, 3, RES, RES) * 2 - 1
    with torch.no_grad():
        before = vae.encode(x).latent_dist
        pin_posterior(vae)
        after = vae.encode(x).latent_dist
    assert float(before.std.min()) > 0.1  # a fresh VAE's posterior is wide: the control
    assert torch.equal(before.mean, after.mean)
    assert float(after.std.max()) < 1e-6 and float((after.sample() - after.mean).abs().max()) < 1e-5


def test_init_base_writes_a_vae_whose_samples_are_its_mean(tmp_path):
    import torch
    from diffusers import AutoencoderKL

    from lftk.cli import app
    from lftk.model.base import read_meta

    out = tmp_path / "base"
    with pytest.raises(SystemExit) as exit_info:
        app(["init-base", str(out), "--preset", "tiny", "--frames", str(_pair_dir(tmp_path / "pairs")), "--vae-steps", "3"],
            standalone_mode=True)
    assert exit_info.value.code == 0
    fit = read_meta(out)["vae_fit"]
    assert fit["posterior"] == "pinned to its mean" and fit["posterior_std_fitted"] > 1e-3
    vae = AutoencoderKL.from_pretrained(out / "vae")  # stock diffusers, as training and users load it
    with torch.no_grad():
        post = vae.encode(torch.rand(1, 3, RES, RES) * 2 - 1).latent_dist
    assert float(post.std.max()) < 1e-6
