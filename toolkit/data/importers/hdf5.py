"""RoboTwin 2.0 HDF5: `<root>/<task>/<config>/data/episode<i>.hdf5`, instructions beside it in
`<root>/<task>/<config>/instructions/episode<i>.json` ({"seen": [...], "unseen": [...]}).

In each file `observation/<camera>/rgb` holds one encoded image (JPEG) per frame, as fixed-length,
null-padded byte strings; `joint_action/*` and `endpose/*` hold per-frame arrays. Frames are read
one element at a time (a file holds hundreds of full-size JPEGs; only the current one is in memory).
SRC may be the root, one task dir, one config dir, or one file.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
from PIL import Image

from lftk.data.images import decode_image_bytes
from lftk.data.importers.base import (
    ROBOTWIN_CAMERA,
    BadSource,
    Context,
    EpisodeSource,
    Frame,
    default_instruction,
    per_frame_value,
    source_rate,
    task_name,
    visible_files,
)
from lftk.errors import LftkError

log = logging.getLogger(__name__)

SUFFIXES = (".hdf5", ".h5")
EXTRA_GROUPS = ("joint_action", "endpose")  # per-frame robot state worth keeping for trajectory metrics


def find(ctx: Context) -> list[Path]:
    if ctx.src.is_file():
        return [ctx.src]
    files = visible_files(ctx.src, SUFFIXES)
    if not files:
        raise LftkError(f"{ctx.src}: no .hdf5 files (expected <task>/<config>/data/episode<i>.hdf5 below it)")
    return files


def _layout(path: Path) -> tuple[str, str | None, Path | None]:
    """(task, config, instruction file) from RoboTwin's layout; a file elsewhere is named by its dir."""
    if path.parent.name == "data" and len(path.parents) >= 3:
        config_dir = path.parent.parent
        return config_dir.parent.name, config_dir.name, config_dir / "instructions" / f"{path.stem}.json"
    return path.parent.name, None, None


def _instruction(path: Path | None, task: str, ctx: Context) -> tuple[str, dict]:
    """--instruction, else the first "seen" entry of the episode's file (all of them kept as alternatives), else the task."""
    if ctx.opts.instruction or path is None or not path.is_file():
        return default_instruction(task, ctx.opts), {}
    try:
        data = json.loads(path.read_text())
        seen = [s.strip() for s in data.get("seen", []) if isinstance(s, str) and s.strip()]
        unseen = [s.strip() for s in data.get("unseen", []) if isinstance(s, str) and s.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        ctx.ledger.warn(path, f"unreadable instruction file ({exc}); using the task name")
        return default_instruction(task, ctx.opts), {}
    if not seen:
        ctx.ledger.warn(path, "no 'seen' instruction; using the task name")
        return default_instruction(task, ctx.opts), {}
    # The first "seen" phrasing trains; the others (and the held-out "unseen" ones) stay for later use.
    return seen[0], {"instructions": {"seen": seen, "unseen": unseen}}


def _per_frame_arrays(f: h5py.File, n: int) -> dict[str, np.ndarray]:
    """Datasets under joint_action/ and endpose/ with one row per frame ("joint_action/left_arm" -> (n, 6))."""
    found: dict[str, np.ndarray] = {}
    for group in EXTRA_GROUPS:
        if group not in f:
            continue
        node = f[group]
        items = [(group, node)] if isinstance(node, h5py.Dataset) else []
        if isinstance(node, h5py.Group):
            node.visititems(lambda name, obj: items.append((f"{group}/{name}", obj)) if isinstance(obj, h5py.Dataset) else None)
        for key, ds in sorted(items, key=lambda kv: kv[0]):
            if ds.shape[:1] == (n,) and ds.dtype.kind in "fiub":
                found[key] = ds[()]  # (n, ...) small: a few floats per frame
            else:
                log.debug("%s: %s has shape %s, not one row per frame: not kept", f.filename, key, ds.shape)
    return found


def _vlen_bytes(value) -> bytes:
    return value if isinstance(value, bytes) else np.asarray(value).tobytes()


def _decoder(ds: h5py.Dataset, name: str):
    """How one element of the rgb dataset becomes an image, by its storage."""
    kind, shape = ds.dtype.kind, ds.shape
    if kind == "S" and len(shape) == 1:  # fixed-length: numpy drops the null padding when indexing
        return lambda j: decode_image_bytes(bytes(ds[j]).rstrip(b"\0"), f"{name}[{j}]")
    if kind == "O" and len(shape) == 1:  # variable-length bytes, or vlen uint8
        return lambda j: decode_image_bytes(_vlen_bytes(ds[j]), f"{name}[{j}]")
    if kind == "u" and ds.dtype.itemsize == 1 and len(shape) == 2:  # (T, max_len) padded byte rows
        return lambda j: decode_image_bytes(ds[j].tobytes().rstrip(b"\0"), f"{name}[{j}]")
    if kind == "u" and ds.dtype.itemsize == 1 and len(shape) == 4 and shape[-1] in (3, 4):  # raw (T, H, W, C) pixels
        return lambda j: Image.fromarray(ds[j])
    raise BadSource(name, f"rgb dataset of dtype {ds.dtype} and shape {shape}: not encoded images nor (T, H, W, 3) pixels")


def _load(path: Path, decode, extras: dict[str, np.ndarray], j: int) -> tuple[Image.Image, dict]:
    try:
        img = decode(j)
    except (OSError, KeyError, ValueError, RuntimeError) as exc:  # h5py reading past a truncation, bad chunk
        raise BadSource(path, f"frame {j}: cannot read ({exc})") from None
    return img, {k: per_frame_value(a[j]) for k, a in extras.items()}


@contextmanager
def open_episode(path: Path, ctx: Context) -> Iterator[EpisodeSource]:
    task, config, instruction_file = _layout(path)
    task = task_name(task, ctx.opts)
    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        raise BadSource(path, f"not a readable HDF5 file ({exc})") from None
    try:
        key = f"observation/{(ctx.opts.camera or ROBOTWIN_CAMERA)}/rgb"
        try:
            ds = f[key]
            extras = _per_frame_arrays(f, ds.shape[0])
        except KeyError:
            cams = sorted(f["observation"].keys()) if "observation" in f else []
            raise BadSource(path, f"no {key} (cameras here: {', '.join(cams) or 'none'})") from None
        except (OSError, RuntimeError) as exc:
            raise BadSource(path, f"cannot read ({exc}); truncated?") from None
        decode = _decoder(ds, key)  # errors read "<file>: skipped: observation/head_camera/rgb[7]: ..."
        instruction, more = _instruction(instruction_file, task, ctx)
        frames = (Frame(j, None, partial(_load, path, decode, extras, j)) for j in range(ds.shape[0]))
        meta = {"camera": (ctx.opts.camera or ROBOTWIN_CAMERA), **({"config": config} if config else {}), **more}
        yield EpisodeSource(path, task, instruction, frames, source_rate(ctx.opts), meta)
    finally:
        f.close()
