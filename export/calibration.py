"""Calibration data for int8: real UNet inputs, recorded while the torch sampler runs on training pairs.

Post-training quantization sets each activation's int8 scale from the ranges it sees, so the inputs
must be what the UNet meets in use: latents of real frames at every timestep of a sampling run,
embeddings of real instructions in the model's prompt template, all three CFG branches. Running
the exported sampler loop (torch modules) over a few training pairs and recording every UNet call
gives exactly that, no synthetic noise.

The pair dir is the run's own training data (resolved_config.yaml `data.path`) unless `--calib DIR`
names another; pairs are taken evenly spaced over the train split (all tasks, sorted names), with
their instruction. A frame from a held-out split (test, else val) is kept for the quality check.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from lftk.data.images import load_rgb
from lftk.data.pairset import PairSet, split_names
from lftk.errors import LftkError
from lftk.runtime.contract import ComponentContract
from lftk.export.parity import ComponentNetworks
from lftk.runtime.pixels import images_to_model
from lftk.runtime.sampler import IP2PSampler
from lftk.model.resolve import ModelRef
from lftk.runtime.params import SamplingParams

log = logging.getLogger(__name__)

CALIB_PAIRS = 8  # pairs sampled; x steps x 1 UNet call (3 CFG branches) each
CALIB_STEPS = 8  # sampling steps per pair: spreads the recorded timesteps over the schedule
CALIB_SPLITS = ("train",)
HELDOUT_SPLITS = ("test", "val")


@dataclass
class Calibration:
    pair_dir: Path
    split: str
    pairs: list[str]  # sample names used
    feeds: list[dict[str, np.ndarray]] = field(default_factory=list)  # one UNet call each
    heldout: tuple[np.ndarray, str, str] | None = None  # (frame (1, H, W, 3) uint8, prompt, sample name)

    def describe(self) -> dict:
        return {
            "pair_dir": str(self.pair_dir),
            "split": self.split,
            "pairs": len(self.pairs),
            "unet_batches": len(self.feeds),
            "samples": sum(int(next(iter(f.values())).shape[0]) for f in self.feeds),
            "timesteps": sorted({round(float(f["timestep"][0]), 2) for f in self.feeds}),
        }


def _run_data_path(run_dir: Path) -> Path | None:
    cfg = Path(run_dir) / "resolved_config.yaml"
    if not cfg.is_file():
        return None
    data = (yaml.safe_load(cfg.read_text()) or {}).get("data") or {}
    path = data.get("path")
    if not path:
        return None
    path = Path(path)
    if path.is_absolute():
        return path
    # Relative paths were relative to where training ran: usually the cwd, else a parent of the run.
    for root in (Path.cwd(), *Path(run_dir).resolve().parents):
        if (root / path).is_dir():
            return root / path
    return Path.cwd() / path


def find_pair_dir(ref: ModelRef, calib: Path | None, source: str | None = None) -> Path:
    """`--calib DIR`, else the run's training data (the run itself, or the run an export came from)."""
    if calib is not None:
        path = Path(calib)
    else:
        run = ref.path if ref.kind == "run" else Path(source) if source else None
        path = _run_data_path(run) if run is not None else None
        if path is None:
            raise LftkError(
                f"{ref.path}: int8 calibrates on training frames, and this {ref.kind} dir does not name its "
                "training data: pass --calib PAIR_DIR (a pair dir from `lftk data pairs`)"
            )
    if not path.is_dir() or not split_names(path):
        raise LftkError(f"calibration pair dir {path}: not found or has no split dirs (train/ val/ test/)")
    return path


def pick_pairs(pair_dir: Path, n: int) -> tuple[str, list]:
    for split in (*CALIB_SPLITS, *split_names(pair_dir)):
        pairs = PairSet(pair_dir, split) if (pair_dir / split).is_dir() else []
        if len(pairs):
            idx = np.unique(np.linspace(0, len(pairs) - 1, min(n, len(pairs))).round().astype(int))
            return split, [pairs[int(i)] for i in idx]
    raise LftkError(f"calibration pair dir {pair_dir}: no samples in any split")


class _Recorder:
    """A UNet callable that keeps a numpy copy of every call's inputs."""

    def __init__(self, module, names: list[str], feeds: list):
        self.module, self.names, self.feeds = module, names, feeds

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        self.feeds.append({n: t.detach().cpu().numpy().copy() for n, t in zip(self.names, tensors)})
        return self.module(*tensors)


def gather(
    pipe,
    contracts: dict[str, ComponentContract],
    pair_dir: Path,
    resolution: int,
    template: str,
    pairs: int = CALIB_PAIRS,
    steps: int = CALIB_STEPS,
    seed: int = 0,
    sampling: SamplingParams = SamplingParams(),
) -> Calibration:
    """Record the UNet inputs of `steps`-step sampling runs over `pairs` training pairs, guided as
    `sampling` says (the model's defaults: the three CFG branches the runner will feed)."""
    split, chosen = pick_pairs(Path(pair_dir), pairs)
    calib = Calibration(Path(pair_dir), split, [p.name for p in chosen])
    unet = contracts["unet"]
    calls = {n: c.module(pipe) for n, c in contracts.items()}
    calls["unet"] = _Recorder(calls["unet"], unet.input_names(), calib.feeds)
    sampler = IP2PSampler(ComponentNetworks(calls), pipe.scheduler, pipe.vae.config.scaling_factor)
    with torch.inference_mode():
        for k, pair in enumerate(chosen):
            frame = images_to_model(load_rgb(pair.current, resolution)[None])
            # The pair's own horizon: the prompt training gave this pair (pairs drawn from the model's horizons).
            embeds = sampler.encode_prompt(pipe.tokenizer, pair.format(template))
            sampler.denoise(frame, embeds, steps, sampling.guidance, sampling.image_guidance,
                            torch.Generator().manual_seed(seed + k))
    for split_name in HELDOUT_SPLITS:
        if (Path(pair_dir) / split_name).is_dir() and len(held := PairSet(pair_dir, split_name)):
            pair = held[0]
            calib.heldout = (load_rgb(pair.current, resolution)[None], pair.format(template), pair.name)
            break
    log.debug("calibration: %d UNet calls from %d %s pairs of %s", len(calib.feeds), len(chosen), split, pair_dir)
    return calib
