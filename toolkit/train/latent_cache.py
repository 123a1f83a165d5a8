"""VAE latents of every pair, computed once per (VAE weights, resolution, frames) and memory-mapped.

The VAE is frozen during fine-tuning, so encoding the same frames every epoch is wasted work: with
the cache a step runs only the text encoder and the UNet. The future frame's posterior is stored
as (mean, std), not as one sample, so the per-step posterior draw stays exactly what it is without
the cache. Arrays are .npy files opened with mmap: memory does not grow with the dataset.

A cache is used only when it was built from the same frames: its index records a digest of every
pair's name and both frames' bytes (pairs rebuilt under the same names with another horizon, or from
re-simulated episodes, get new latents) and each array's size and digest (a damaged cache is rebuilt
with a WARNING, never read).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
import numpy as np
import torch

from lftk import atomic
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


def frames_digest(pairs: PairSet) -> str:
    """sha256 over every pair's name and the bytes of its current and future frame files."""
    h = hashlib.sha256()
    for i in range(len(pairs)):
        h.update(pairs.name(i).encode() + b"\0")
        for frame in (pairs.current(i), pairs.future(i)):
            h.update(hashlib.sha256(Path(frame).read_bytes()).digest())
    return h.hexdigest()


def _problem(path: Path, names: list[str], frames: str) -> str | None:
    """Why the cache at `path` cannot be used for these pairs, or None when it can."""
    index = path / INDEX
    if not index.is_file():
        return "no cache"
    try:
        meta = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{index} is unreadable"
    if not isinstance(meta, dict) or "frames" not in meta:
        return "built by an older lftk (no digest of its frames)"
    if meta.get("samples") != names or meta.get("frames") != frames:
        return "built from other frames"
    for key in ARRAYS:
        f, want = path / f"{key}.npy", meta.get("arrays", {}).get(key, {})
        if not f.is_file() or f.stat().st_size != want.get("bytes") or atomic.sha256_file(f) != want.get("sha256"):
            return f"{f} is missing or damaged"
    return None


def _valid(path: Path, names: list[str], frames: str) -> bool:
    return _problem(path, names, frames) is None


@torch.no_grad()
def build(pixels_of, pairs: PairSet, vae, path: Path, batch_size: int = 32) -> Path:
    """Encode every pair into `path` (atomically: a killed build leaves nothing that looks complete)."""
    names, frames = pairs.names(), frames_digest(pairs)
    problem = _problem(path, names, frames)
    if problem is None:
        return path
    if problem != "no cache":
        log.warning("latent cache %s: %s; rebuilding it", path, problem)
    tmp = atomic.staging_dir(path)
    t0 = time.perf_counter()
    try:
        _encode_into(tmp, pixels_of, pairs, vae, batch_size)
        arrays = {k: {"bytes": (tmp / f"{k}.npy").stat().st_size, "sha256": atomic.sha256_file(tmp / f"{k}.npy")} for k in ARRAYS}
        (tmp / INDEX).write_text(json.dumps({"samples": names, "frames": frames, "arrays": arrays}))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic.swap_in(tmp, path)
    log.info("cached VAE latents of %d pairs in %.0f s: %s", len(pairs), time.perf_counter() - t0, path)
    return path


def _encode_into(tmp: Path, pixels_of, pairs: PairSet, vae, batch_size: int) -> None:
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


def wait_for(path: Path, pairs: PairSet, timeout_s: float = 3600) -> None:
    """Other ranks wait while rank 0 builds the cache."""
    deadline = time.time() + timeout_s
    names, frames = pairs.names(), frames_digest(pairs)
    while not _valid(path, names, frames):
        if time.time() > deadline:
            raise TimeoutError(f"latent cache {path} not built within {timeout_s:.0f} s")
        time.sleep(1.0)


class LatentArrays:
    """Memory-mapped latents; row i belongs to pair i of the split."""

    def __init__(self, path: Path):
        self.arrays = {k: np.load(path / f"{k}.npy", mmap_mode="r") for k in ARRAYS}

    def row(self, i: int) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.array(a[i])) for k, a in self.arrays.items()}
