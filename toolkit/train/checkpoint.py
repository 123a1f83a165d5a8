"""Checkpoints that survive SIGKILL: complete-or-absent, rotated, resumable exactly.

DeepSpeed writes a tag dir (model, optimizer, LR schedule); lftk adds the RNG states and a
COMPLETE marker written last, then points `latest` at the tag with an atomic rename. A run killed
mid-save leaves a tag dir without COMPLETE, which resume ignores and the next rotation removes.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from lftk.errors import LftkError

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step{step:07d}"


def complete_tags(ckpt_dir: Path) -> list[str]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and (p / COMPLETE).is_file())


def save(engine, ckpt_dir: Path, step: int, rank: int, keep: int, aux=None) -> None:
    """Collective: every rank calls it (ZeRO shards the optimizer state across ranks).
    The data position and per-sample noise follow from `step`; the global torch RNG (LoRA dropout) is saved."""
    tag = tag_for(step)
    client = {"step": step, "torch_rng": torch.get_rng_state(), "aux": aux.state_dict() if aux else {}}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client, save_latest=False)
    _barrier()
    if rank == 0:
        (ckpt_dir / tag / COMPLETE).write_text(f"{step}\n")
        tmp = ckpt_dir / (LATEST + ".tmp")
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / LATEST)
        _rotate(ckpt_dir, keep, current=tag)
    _barrier()


def _rotate(ckpt_dir: Path, keep: int, current: str) -> None:
    done = complete_tags(ckpt_dir)
    stale = [t for t in done[:-keep] if t != current] if keep > 0 else []
    partial = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step") and p.name not in done]
    for name in stale + [p for p in partial if p != current]:
        shutil.rmtree(ckpt_dir / name, ignore_errors=True)


def load(engine, ckpt_dir: Path, aux=None) -> int:
    """Restore the newest complete checkpoint into `engine` and the torch RNG; returns its step."""
    tags = complete_tags(ckpt_dir)
    if not tags:
        raise LftkError(f"{ckpt_dir}: no complete checkpoint to resume from")
    tag = tags[-1]
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None or client is None:
        raise LftkError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
    torch.set_rng_state(client["torch_rng"])
    if aux is not None:
        aux.load_state_dict(client.get("aux", {}))
    log.info("resumed from %s (step %d)", ckpt_dir / tag, client["step"])
    return int(client["step"])


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
