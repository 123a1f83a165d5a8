"""Folders of frames: every dir holding images directly is one episode, its frames in natural order
(`0.jpg, 2.jpg, 10.jpg`; `000001.png`; `frame_9.png` before `frame_10.png`). The task is the
episode dir's parent dir (`<root>/<task>/<episode>/`), or --task. A folder carries no frame rate:
pass --fps when it is not the toolkit's 10 fps.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from PIL import Image

from lftk.data.images import open_image
from lftk.data.importers.base import (
    Context,
    EpisodeSource,
    Frame,
    default_instruction,
    natural_sorted,
    source_rate,
    task_name,
    visible_files,
)
from lftk.errors import LftkError

SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def find(ctx: Context) -> list[Path]:
    if ctx.src.is_file():
        raise LftkError(f"{ctx.src}: --format frames takes a folder of frames (or dirs above such folders), not a file")
    dirs = sorted({p.parent for p in visible_files(ctx.src, SUFFIXES)})
    if not dirs:
        raise LftkError(f"{ctx.src}: no frames ({', '.join(SUFFIXES)}) below it")
    return natural_sorted(dirs, ctx.src.parent)


def _load(path: Path) -> tuple[Image.Image, dict]:
    return open_image(path), {}  # LftkError naming the file when it does not decode


@contextmanager
def open_episode(path: Path, ctx: Context) -> Iterator[EpisodeSource]:
    task = task_name(path.parent.name, ctx.opts)
    files = natural_sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file() and not p.name.startswith("."))
    files = [ctx.inside(p) for p in files]  # one frame linked out of SRC: the episode is skipped, not gapped
    frames = (Frame(j, None, lambda p=p: _load(p)) for j, p in enumerate(files))
    yield EpisodeSource(path, task, default_instruction(task, ctx.opts), frames, source_rate(ctx.opts))
