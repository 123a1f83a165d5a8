"""Videos (PyAV): each file is one episode, its task the file's dir (or --task).

The container's frame timestamps drive the resampling to the toolkit's 10 fps (nearest frame per
tick), so a 30 fps clip keeps every third frame and "100 frames" still means 10 seconds. --fps
overrides a container that states the wrong rate: frames are then taken as evenly spaced at that rate.
"""

from __future__ import annotations

from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av

from lftk.data.importers.base import (
    BadSource,
    Context,
    EpisodeSource,
    Frame,
    default_instruction,
    source_rate,
    task_name,
    visible_files,
)
from lftk.errors import LftkError

SUFFIXES = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v")


def find(ctx: Context) -> list[Path]:
    if ctx.src.is_file():
        return [ctx.src]
    files = visible_files(ctx.src, SUFFIXES)
    if not files:
        raise LftkError(f"{ctx.src}: no videos ({', '.join(SUFFIXES)}) below it")
    return files


def _frames(container, stream, path: Path, stamped: bool) -> Iterator[Frame]:
    j = 0
    try:
        for j, frame in enumerate(container.decode(stream)):
            t = Fraction(frame.pts) * stream.time_base if stamped and frame.pts is not None else None
            # Converted only if the resampler keeps it: to_image is the costly part after decoding.
            yield Frame(j, t, lambda frame=frame: (frame.to_image(), {}))
    except av.error.FFmpegError as exc:
        raise BadSource(path, f"decoding stopped after {j} frame(s) ({exc}); truncated?") from None


@contextmanager
def open_episode(path: Path, ctx: Context) -> Iterator[EpisodeSource]:
    task = task_name(path.parent.name, ctx.opts)
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise BadSource(path, f"not a readable video ({exc})") from None
    try:
        if not container.streams.video:
            raise BadSource(path, "no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # decoding threads: the same frames, faster
        read = stream.average_rate or stream.guessed_rate
        rate = source_rate(ctx.opts, Fraction(read) if read else None)
        if rate is None:
            raise BadSource(path, "the container states no frame rate: pass --fps RATE")
        stamped = ctx.opts.fps is None and stream.time_base is not None  # --fps: the stamps are not to be trusted
        meta = {"source_fps_read": float(read) if read else None, "codec": stream.codec_context.name}
        yield EpisodeSource(path, task, default_instruction(task, ctx.opts), _frames(container, stream, path, stamped), rate, meta)
    finally:
        container.close()
