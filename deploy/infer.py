"""`lftk infer`: one frame + an instruction -> a rollout of future frames on disk, with timings.

OUT/frame_000.png is the input (at the model's resolution), frame_001.png ... the predictions in
order, OUT/rollout.gif all of them, OUT/timing.json what ran where and how fast.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from lftk.data.images import load_rgb, save_rgb
from lftk.predictor import load
from lftk.runtime.runner import Runner
from lftk.errors import LftkError, NotAvailableError
from lftk.runtime.contract import CFG_BRANCHES
from lftk.runtime.sampler import uses_cfg

log = logging.getLogger(__name__)

MODES = ("rollout", "sweep")
GIF_MS_PER_FRAME = 250


def _write_outputs(out: Path, frames: list[np.ndarray]) -> list[str]:
    """frame_*.png; first removes what an earlier run left that this one may not write again (more
    frames, truth frames, compare.gif, rollout.mp4)."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("frame_*.png"), *out.glob("truth_*.png"), out / "compare.gif", out / "rollout.mp4"]:
        stale.unlink(missing_ok=True)
    names = []
    for i, frame in enumerate(frames):
        name = f"frame_{i:03d}.png"
        save_rgb(frame, out / name)
        names.append(name)
    return names


def _write_gif(path: Path, frames: list[np.ndarray]) -> str:
    gif = [Image.fromarray(f) for f in frames]
    gif[0].save(path, save_all=True, append_images=gif[1:], duration=GIF_MS_PER_FRAME, loop=0)
    return path.name


def _write_mp4(path: Path, frames: list[np.ndarray]) -> str:
    try:
        import av
    except ImportError as exc:
        raise NotAvailableError("--mp4 needs PyAV: pip install av (or pip install 'lftk[data]')") from exc
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=1000 // GIF_MS_PER_FRAME)
        stream.width, stream.height, stream.pix_fmt = w - w % 2, h - h % 2, "yuv420p"
        for frame in frames:
            video = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[: h - h % 2, : w - w % 2]), format="rgb24")
            container.mux(stream.encode(video))
        container.mux(stream.encode())
    return path.name


def _side_by_side(predicted: list[np.ndarray], truth: list[np.ndarray | None]) -> list[np.ndarray]:
    """prediction | truth per frame; a grey half where the episode has no frame that far ahead."""
    out = []
    for p, t in zip(predicted, truth):
        t = np.full_like(p, 128) if t is None else t
        out.append(np.concatenate([p, np.full((p.shape[0], 2, 3), 255, np.uint8), t], axis=1))  # (H, 2W+2, 3)
    return out


def _open_episode(episode: Path, start_frame: int):
    from lftk.data.episodes import read_episode

    try:
        ep = read_episode(Path(episode))
    except (ValueError, OSError) as exc:
        raise LftkError(f"--episode {episode}: {exc}") from None
    if not 0 <= start_frame < ep.n_frames:
        raise LftkError(f"--start-frame {start_frame}: {episode} has frames 0..{ep.n_frames - 1}")
    return ep


def _offsets(runner: Runner, mode: str, frames: int, horizons: Sequence[int] | None) -> list[int | None]:
    """Frames ahead of the input for each prediction: k·Δ for a rollout, the given horizons for a sweep."""
    if mode == "sweep":
        runner.require_horizon_conditioned()
        chosen = list(horizons or runner.horizons)
        if not chosen:
            raise LftkError("sweep: give --horizon H1,H2,... (the model records no horizons)")
        return chosen
    if horizons and len(horizons) != 1:
        raise LftkError(f"rollout takes one --horizon (the step Δ), got {','.join(map(str, horizons))}; several are for --mode sweep")
    step = horizons[0] if horizons else runner.default_horizon
    return [None if step is None else step * k for k in range(1, frames + 1)]


def run_infer(
    model: str | Path,
    image: Path | None,
    instruction: str | None,
    backend: str = "ort",
    frames: int = 15,
    mode: str = "rollout",
    steps: int | None = None,
    seed: int = 0,
    out: Path = Path("infer_out"),
    guidance: float | None = None,
    image_guidance: float | None = None,
    scheduler: str | None = None,
    precision: str | None = None,
    horizons: Sequence[int] | None = None,
    postprocess: str | Sequence[str] | None = None,
    episode: Path | None = None,
    start_frame: int = 0,
    mp4: bool = False,
    compile: bool = False,
    keep: float | None = None,
    keep_objects: bool | None = None,
) -> dict:
    """Predict future frames from IMAGE; returns (and writes to OUT/timing.json) the summary.

    `mode`: rollout (`frames` predictions, each from the one before, Δ apart) or sweep (one prediction
    per horizon in `horizons`, all from IMAGE, in one batch; needs a horizon-conditioned model).
    `episode`: an episode dir: IMAGE and the instruction default to its frame `start_frame` and its
    instruction, and its true future frames are written beside the predictions (truth_*.png,
    compare.gif) with each prediction's PSNR against them in timing.json.
    `steps`, `guidance`, `image_guidance`, `keep` and `keep_objects` left None are the model's own (lftk_model.json "sampling").
    """
    from lftk.model.postprocess import make_postprocess

    if mode not in MODES:
        raise LftkError(f"unknown mode '{mode}': choose one of {', '.join(MODES)}")
    if frames < 1 or (steps is not None and steps < 1):
        raise LftkError(f"--frames and --steps must be >= 1 (got frames={frames}, steps={steps})")
    make_postprocess(postprocess)  # a typo fails before the episode or the model is opened
    ep = _open_episode(episode, start_frame) if episode is not None else None
    if ep is not None:
        image = image or ep.frame_paths[start_frame]
        instruction = instruction or ep.instruction
    if image is None:
        raise LftkError("give --image FRAME (or --episode DIR to start from one of its frames)")
    if not instruction or not instruction.strip():
        raise LftkError("--instruction is empty: say what the robot does, e.g. 'stack the blocks'")
    out = Path(out)

    t0 = time.perf_counter()
    predictor = load(model, backend, precision=precision, scheduler=scheduler, compile=compile, postprocess=postprocess)
    runner, be = predictor.runner, predictor.backend
    current = predictor.frame(image)
    offsets = _offsets(runner, mode, frames, horizons)
    params = runner.sampling.overridden(steps=steps, guidance=guidance, image_guidance=image_guidance, keep=keep,
                                        keep_objects=keep_objects)
    options = dict(steps=params.steps, guidance=params.guidance, image_guidance=params.image_guidance, seed=seed,
                   keep=params.keep, keep_objects=params.keep_objects)
    steps, guidance, image_guidance = params.steps, params.guidance, params.image_guidance
    load_s = time.perf_counter() - t0

    be.reset_stats()
    t0 = time.perf_counter()
    if mode == "sweep":
        predicted = predictor.sweep(current, instruction, offsets, **options)
    else:  # horizon None: the model's own step
        predicted = predictor.rollout(current, instruction, frames, horizon=horizons[0] if horizons else None, **options)
    predicted = [np.asarray(f) for f in predicted]
    total_s = time.perf_counter() - t0

    names = _write_outputs(out, [current] + predicted)
    names.append(_write_gif(out / "rollout.gif", [current] + predicted))
    truth_report = None
    if ep is not None:
        truth_report, truth_names = _compare_with_episode(out, ep, start_frame, offsets, predicted, runner.resolution)
        names += truth_names
    if mp4:
        names.append(_write_mp4(out / "rollout.mp4", [current] + predicted))
    n = len(predicted)
    unet_calls = be.stats["unet"][0]
    timing = {
        "backend": be.name,
        "precision": getattr(be, "precision", "fp32"),
        "compiled": compile,
        "providers": be.providers,
        "mode": mode,
        "model": str(model),
        "image": str(image),
        "instruction": instruction,
        "resolution": runner.resolution,
        "steps": steps,
        "frames": n,
        "frames_ahead": offsets,
        "seed": seed,
        "guidance": guidance,
        "image_guidance": image_guidance,
        "keep": params.keep,
        "keep_objects": params.keep_objects,
        "scheduler": predictor.scheduler,
        "postprocess": list(getattr(runner.postprocess, "steps", ())),
        "load_seconds": round(load_s, 3),
        "total_seconds": round(total_s, 3),
        "ms_per_frame": round(1000 * total_s / n, 2),
        "unet_calls": unet_calls,
        # frames per UNet call x CFG branches: 1 frame at a time in a rollout, all of them in a sweep
        "unet_batch": (n if mode == "sweep" else 1) * (CFG_BRANCHES if uses_cfg(guidance, image_guidance) else 1),
        "ms_per_unet_call": round(be.ms_per_call("unet") or 0.0, 3),
        "ms_per_call": {c: round(be.ms_per_call(c) or 0.0, 3) for c in be.stats},
    }
    if truth_report is not None:
        timing["truth"] = truth_report
    (out / "timing.json").write_text(json.dumps(timing, indent=2))
    log.info(
        "%d frames (%s, %s, %d steps) in %.2f s: %.0f ms/frame, %.1f ms per UNet call -> %s",
        n, mode, be.name, steps, total_s, timing["ms_per_frame"], timing["ms_per_unet_call"], out,
    )
    return {**timing, "out": str(out), "files": names + ["timing.json"]}


def _compare_with_episode(out: Path, ep, start: int, offsets, predicted, resolution: int) -> tuple[dict, list[str]]:
    """truth_000.png (the input) and truth_k.png for each prediction the episode reaches, compare.gif,
    and per-frame PSNR against the truth."""
    from lftk.eval.metrics import psnr_db

    if any(o is None for o in offsets):
        raise LftkError("--episode: the model records no horizon, so the true frames are unknown: give --horizon")
    truth = [load_rgb(ep.frame_paths[start + o], resolution) if start + o < ep.n_frames else None for o in offsets]
    names = []
    for k, t in enumerate([load_rgb(ep.frame_paths[start], resolution)] + truth):
        if t is not None:
            names.append(f"truth_{k:03d}.png")
            save_rgb(t, out / names[-1])
    names.append(_write_gif(out / "compare.gif", _side_by_side(predicted, truth)))
    report = {
        "episode": str(ep.path),
        "start_frame": start,
        "frames": [start + o if t is not None else None for o, t in zip(offsets, truth)],
        "psnr_db": [None if t is None else round(float(psnr_db(p / 255.0, t / 255.0)), 3) for p, t in zip(predicted, truth)],
    }
    return report, names
