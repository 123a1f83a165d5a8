"""Checkpoints that survive SIGKILL and damage: complete-or-absent, verified, rotated, resumable exactly.

DeepSpeed writes a tag dir (model, optimizer, LR schedule); lftk adds the RNG states and a
COMPLETE marker written last, which records every file of the tag with its size and sha256, then
points `latest` at the tag with an atomic rename. A run killed mid-save leaves a tag dir without
COMPLETE, which resume ignores and the next rotation removes. Resume verifies the newest complete
tag against its marker and falls back to the newest intact one, with a WARNING naming the bad file.

Loading never runs code from a checkpoint: DeepSpeed's own loader unpickles with
`weights_only=False`, so lftk swaps in one that loads tensors and plain data only (plus the few
DeepSpeed types its ZeRO optimizers store, by name). A checkpoint that needs more is refused with
the type it asks for, unless `lftk train --resume --trust-checkpoint` says the file is trusted.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import torch

from lftk.atomic import sha256_file
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
    if rank == 0 and (ckpt_dir / tag).exists():
        shutil.rmtree(ckpt_dir / tag)  # a partial or damaged leftover of this step: never mix its files with new ones
    _barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client, save_latest=False)
    _barrier()
    if rank == 0:
        (ckpt_dir / tag / COMPLETE).write_text(json.dumps({"step": step, "files": _inventory(ckpt_dir / tag)}, indent=1) + "\n")
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


def _inventory(tag_dir: Path) -> dict:
    """{relative path: {"bytes", "sha256"}} of every file DeepSpeed wrote into the tag."""
    files = sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != COMPLETE)
    return {str(p.relative_to(tag_dir)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}


def verify(tag_dir: Path) -> str | None:
    """Why the tag cannot be trusted to load (naming the file), or None when every recorded file matches."""
    marker = tag_dir / COMPLETE
    try:
        meta = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"{marker} is unreadable"
    if isinstance(meta, int):
        log.warning("%s: written by an older lftk without file digests; loading it unverified", tag_dir)
        return None
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not files:
        return f"{marker} lists no files"
    for rel, want in files.items():
        f = tag_dir / rel
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != want.get("bytes"):
            return f"{f} has {f.stat().st_size} bytes, {want.get('bytes')} when saved"
        if sha256_file(f) != want.get("sha256"):
            return f"{f} differs from the file saved (sha256)"
    return None


# Types DeepSpeed's ZeRO optimizers pickle into *_optim_states.pt besides tensors and plain data.
_DEEPSPEED_TYPES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _allowed_types() -> list:
    import importlib

    out = []
    for dotted in _DEEPSPEED_TYPES:
        module, _, name = dotted.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue  # another DeepSpeed version: it cannot have stored a type it does not have
    return out


class WeightsOnlyLoader:
    """Stands in for DeepSpeed's checkpoint engine: its `load` unpickles tensors and plain data only."""

    def __init__(self, inner, trust: bool):
        self._inner, self._trust = inner, trust

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load(self, path: str, map_location=None):
        if self._trust:
            return torch.load(path, map_location=map_location, weights_only=False)
        try:
            with torch.serialization.safe_globals(_allowed_types()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            import re

            asked = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(exc))
            what = f"it asks for {asked.group(1)}" if asked else str(exc).strip().splitlines()[-1][:300]
            raise LftkError(
                f"{path}: refused: loading it needs more than tensors and plain data ({what}). Loading such a file "
                "can run code; pass --trust-checkpoint only if you trust where it came from"
            ) from exc


def load(engine, ckpt_dir: Path, aux=None, trust: bool = False) -> int:
    """Restore the newest intact complete checkpoint into `engine` and the torch RNG; returns its step
    (0 when the run was stopped before its first checkpoint: it starts over, as it would have)."""
    tags = complete_tags(ckpt_dir)
    if not tags:
        log.warning("%s: no complete checkpoint yet (stopped before the first one): starting from step 0", ckpt_dir)
        return 0
    bad = []
    for tag in reversed(tags):
        problem = verify(ckpt_dir / tag)
        if problem is None:
            break
        log.warning("checkpoint %s is damaged: %s; trying the one before it", ckpt_dir / tag, problem)
        bad.append(problem)
    else:
        raise LftkError(f"{ckpt_dir}: every complete checkpoint is damaged; newest: {bad[0]}")
    if bad:
        log.warning("resuming from %s, the newest intact checkpoint", ckpt_dir / tag)
    if not isinstance(engine.checkpoint_engine, WeightsOnlyLoader):
        engine.checkpoint_engine = WeightsOnlyLoader(engine.checkpoint_engine, trust)
    try:
        path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    except LftkError:
        raise
    except (RuntimeError, OSError, EOFError, KeyError, ValueError) as exc:
        raise LftkError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint: {str(exc).splitlines()[0][:300]}") from exc
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
