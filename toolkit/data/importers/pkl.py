"""RoboTwin 1.x: one pickle per frame, `<root>/<task dir>/episode<i>/<j>.pkl`, each a dict with
`observation/<camera>/rgb` (an (H, W, 3) array) and, when recorded, `joint_action` and `endpose`.

Unpickling runs whatever code the file names, so a pickle from elsewhere can do anything a Python
program can. Nothing is read without --trust-pickle; the error says why. RoboTwin 1.x names its task
dirs `<task>_<camera type>_pkl`: the trailing `_pkl` is dropped, --task names the task exactly.
"""

from __future__ import annotations

import pickle
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Iterator

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
    natural_sorted,
    per_frame_value,
    source_rate,
    task_name,
    visible_files,
)
from lftk.errors import LftkError

SUFFIXES = (".pkl", ".pickle")
EXTRA_KEYS = ("joint_action", "endpose")
REFUSAL = (
    "robotwin-pkl reads Python pickles, and loading a pickle runs whatever code it names: a pickle from an "
    "unknown source can do anything your account can. Pass --trust-pickle only for files you made or trust "
    "(or convert them to frames and use --format frames)"
)


def find(ctx: Context) -> list[Path]:
    if not ctx.opts.trust_pickle:
        raise LftkError(REFUSAL)
    if ctx.src.is_file():
        raise LftkError(f"{ctx.src}: robotwin-pkl takes an episode dir of per-frame pickles (or dirs above it), not one file")
    dirs = sorted({p.parent for p in visible_files(ctx.src, SUFFIXES)})
    if not dirs:
        raise LftkError(f"{ctx.src}: no .pkl files (expected <task>/episode<i>/<j>.pkl below it)")
    return natural_sorted(dirs, ctx.src.parent)


def _image(rgb, name: str) -> Image.Image:
    if isinstance(rgb, (bytes, bytearray)):  # some conversions store encoded frames
        return decode_image_bytes(bytes(rgb), name)
    arr = np.asarray(rgb)
    if arr.dtype.kind == "f":  # renderers hand out [0, 1] floats
        arr = np.round(np.clip(arr, 0.0, 1.0) * 255.0)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
        raise BadSource(name, f"rgb of shape {arr.shape} is not an image")
    return Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8).squeeze()))


def _flat(key: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for k in sorted(value):
            _flat(f"{key}/{k}", value[k], out)
    else:
        v = per_frame_value(value)
        if v is not None:
            out[key] = v


def _load(path: Path, camera: str, j: int) -> tuple[Image.Image, dict]:
    try:
        with open(path, "rb") as fh:
            obj = pickle.load(fh)  # allowed by --trust-pickle (see REFUSAL)
    except Exception as exc:  # a truncated or foreign pickle fails in many ways (EOFError, UnpicklingError, ImportError, ...)
        raise BadSource(path, f"not a readable pickle ({type(exc).__name__}: {exc})") from None
    try:
        rgb = obj["observation"][camera]["rgb"]
    except (KeyError, TypeError, IndexError):
        cams = sorted(obj["observation"]) if isinstance(obj, dict) and isinstance(obj.get("observation"), dict) else []
        raise BadSource(path, f"no observation/{camera}/rgb (cameras here: {', '.join(map(str, cams)) or 'none'})") from None
    extras: dict = {}
    for key in EXTRA_KEYS:
        if key in obj:
            _flat(key, obj[key], extras)
    return _image(rgb, f"{path}:observation/{camera}/rgb"), extras


@contextmanager
def open_episode(path: Path, ctx: Context) -> Iterator[EpisodeSource]:
    task = task_name(path.parent.name.removesuffix("_pkl"), ctx.opts)
    files = [ctx.inside(p) for p in natural_sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file())]
    frames = (Frame(j, None, partial(_load, p, (ctx.opts.camera or ROBOTWIN_CAMERA), j)) for j, p in enumerate(files))
    yield EpisodeSource(path, task, default_instruction(task, ctx.opts), frames, source_rate(ctx.opts), {"camera": (ctx.opts.camera or ROBOTWIN_CAMERA)})
