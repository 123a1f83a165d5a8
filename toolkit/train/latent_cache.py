"""VAE latents of every pair, computed once per (VAE weights, resolution) and memory-mapped.

The VAE is frozen during fine-tuning, so encoding the same frames every epoch is wasted work: with
the cache a step runs only the text encoder and the UNet. The future frame's posterior is stored
as (mean, std), not as one sample, so the per-step posterior draw stays exactly what it is without
the cache. Arrays are .npy files opened with mmap: memory does not grow with the dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
import numpy as np
import torch

from lftk.data.pairset import PairSet
from lftk.progress import progress_bar

log = logging.getLogger(__name__)

ARRAYS = ("cur_mode", "fut_mean", "fut_std")
INDEX = "index.json"


def vae_hash(vae) -> str:
    """Content hash of the VAE weights: a changed VAE never reuses stale latents."""
    h = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_dir(root: Path, vae, resolution: int, split: str) -> Path:
    return Path(root) / f"vae-{vae_hash(vae)}-{resolution}px" / split


def _valid(path: Path, names: list[str]) -> bool:
    index = path / INDEX
    return index.is_file() and json.loads(index.read_text()).get("samples") == names


@torch.no_grad()
def build(pixels_of, pairs: PairSet, vae, path: Path, batch_size: int = 32) -> Path:
    """Encode every pair into `path` (atomically: a killed build leaves nothing that looks complete)."""
    names = pairs.names()
    if _valid(path, names):
        return path
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    out: dict[str, list[np.ndarray]] = {k: [] for k in ARRAYS}
    dtype = next(vae.parameters()).dtype
    device = next(vae.parameters()).device
    with progress_bar("cache latents", total=len(pairs)) as advance:
        for start in range(0, len(pairs), batch_size):
            chunk = range(start, min(start + batch_size, len(pairs)))
            cur = torch.stack([pixels_of(pairs.current(i)) for i in chunk]).to(device, dtype)
            fut = torch.stack([pixels_of(pairs.future(i)) for i in chunk]).to(device, dtype)
            cur_dist, fut_dist = vae.encode(cur).latent_dist, vae.encode(fut).latent_dist
            out["cur_mode"].append(cur_dist.mode().float().cpu().numpy())
            out["fut_mean"].append(fut_dist.mean.float().cpu().numpy())
            out["fut_std"].append(fut_dist.std.float().cpu().numpy())
            advance(len(chunk))
    for key, parts in out.items():
        np.save(tmp / f"{key}.npy", np.concatenate(parts))
    (tmp / INDEX).write_text(json.dumps({"samples": names}))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    log.info("cached VAE latents of %d pairs in %.0f s: %s", len(pairs), time.perf_counter() - t0, path)
    return path


def wait_for(path: Path, names: list[str], timeout_s: float = 3600) -> None:
    """Other ranks wait while rank 0 builds the cache."""
    deadline = time.time() + timeout_s
    while not _valid(path, names):
        if time.time() > deadline:
            raise TimeoutError(f"latent cache {path} not built within {timeout_s:.0f} s")
        time.sleep(1.0)


class LatentArrays:
    """Memory-mapped latents; row i belongs to pair i of the split."""

    def __init__(self, path: Path):
        self.arrays = {k: np.load(path / f"{k}.npy", mmap_mode="r") for k in ARRAYS}

    def row(self, i: int) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.array(a[i])) for k, a in self.arrays.items()}
