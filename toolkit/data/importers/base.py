"""What every importer shares: options, the skip ledger, frame-rate resampling, the episode writer, and
the staging dir that makes OUT appear complete or not at all.

A format module only says where its episodes are (`find`) and how to read one (`open_episode`, a
context manager yielding an `EpisodeSource` whose frames decode lazily). Everything that must be
the same for every format lives here: the resize policy (images.to_square_rgb: centre-crop to a
square, then resize), resampling to the toolkit's 10 fps, the checks for bad data, episode.json,
and the summary.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np
from PIL import Image

from lftk.data.images import save_rgb, to_square_rgb
from lftk import atomic
from lftk.data.pairs import _check_out, _publish
from lftk.errors import LftkError

log = logging.getLogger(__name__)

ROBOTWIN_CAMERA = "head_camera"  # the RoboTwin camera hdf5 and pkl read when --camera is not given
TOOLKIT_FPS = 10  # lftk's horizon of 100 frames is 10 s ahead, which holds only at this rate
SUMMARY_NAME = "import.json"
EXTRA_DIGITS = 6  # per-frame joint/end-effector values: 1e-6 rad or m is far below anything a frame shows


@dataclass(frozen=True)
class ImportOptions:
    instruction: str | None = None  # the same instruction for every episode or pair
    camera: str | None = None  # RoboTwin camera (hdf5, pkl; default head_camera), LeRobot camera key (default: its first)
    fps: float | None = None  # the source's frame rate, when the source does not say or says it wrong
    resolution: int | None = 128  # square side; None keeps the source size (no crop)
    horizon: int = 100  # episodes with no frame pair this far apart are useless to `lftk data pairs`
    trust_pickle: bool = False
    strict: bool = False
    task: str | None = None  # overrides the task name taken from the source's dirs
    follow_links: bool = False  # read files that links or table paths place outside SRC
    episodes: str | None = None  # LeRobot: which episode indices, e.g. "0-9,15" (default: all)


class BadSource(Exception):
    """A file, dir, frame or row that cannot become an episode or pair; skipped unless --strict."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


# PIL names an in-memory file by its object address ("<_io.BytesIO object at 0x7f...>"): dropped so
# that the summary, which lists every skip, is the same bytes on every run.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class Ledger:
    """Skips and warnings of one import: logged as they happen (naming the file), counted in the summary,
    and fatal on the first one under --strict (the staging dir is then removed: nothing is written)."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.skipped: list[dict] = []
        self.warnings: list[dict] = []

    def _strict(self, path: str, reason: str) -> None:
        if self.strict:
            raise LftkError(f"{path}: {reason} (--strict stops at the first problem; nothing was written)")

    def skip(self, path: Path | str, reason: str) -> None:
        reason = _ADDRESS.sub("", reason)
        self._strict(str(path), reason)
        log.warning("%s: skipped: %s", path, reason)
        self.skipped.append({"path": str(path), "reason": reason})

    def warn(self, path: Path | str, reason: str) -> None:
        reason = _ADDRESS.sub("", reason)
        self._strict(str(path), reason)
        log.warning("%s: %s", path, reason)
        self.warnings.append({"path": str(path), "reason": reason})


@dataclass(frozen=True)
class Context:
    src: Path  # SRC as given: relative source paths in the output are taken from here
    opts: ImportOptions
    ledger: Ledger
    format: str

    def inside(self, path: Path) -> Path:
        """`path`, or BadSource when it (through links, `..` or an absolute table path) lies outside SRC
        and --follow-links was not given: an import reads what SRC holds, nothing else on the machine."""
        root = (self.src if self.src.is_dir() else self.src.parent).resolve()
        real = Path(path).resolve()
        if self.opts.follow_links or real == root or root in real.parents:
            return Path(path)
        raise BadSource(path, f"points outside SRC (to {real}); pass --follow-links to read files outside it")


@dataclass(frozen=True)
class Frame:
    index: int  # position in the source
    time: Fraction | None  # seconds, when the source stamps its frames (video); else index / fps
    load: Callable[[], tuple[Image.Image, dict]]  # the decoded image and per-frame extras ("joint_action/left_arm": [...])


@dataclass
class EpisodeSource:
    path: Path  # what a warning about this episode names
    task: str
    instruction: str
    frames: Iterable[Frame]  # lazy: a frame the resampler drops is never decoded
    fps: Fraction | None = None  # the source's rate when known (read or --fps)
    meta: dict = field(default_factory=dict)  # more episode.json keys: camera, instructions, ...


class EpisodeFormat(Protocol):
    def find(self, ctx: Context) -> list[Path]: ...
    def open_episode(self, path: Path, ctx: Context) -> AbstractContextManager[EpisodeSource]: ...


# ---------------------------------------------------------------------------------------------- helpers


def natural_key(name: str) -> tuple:
    """'2.jpg' before '10.jpg': digit runs compare as numbers (split() keeps str/int positions aligned)."""
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts)) + (name,)


def natural_sorted(paths: Iterable[Path], root: Path | None = None) -> list[Path]:
    def key(p: Path) -> tuple:
        parts = p.relative_to(root).parts if root is not None else (p.name,)
        return tuple(natural_key(x) for x in parts)

    return sorted(paths, key=key)


def visible_files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files under `root` (recursively) with one of `suffixes`, hidden dirs and files left out, in natural order."""
    found = [
        p
        for p in root.rglob("*")
        if p.suffix.lower() in suffixes and p.is_file() and not any(x.startswith(".") for x in p.relative_to(root).parts)
    ]
    return natural_sorted(found, root)


def relative_name(path: Path, src: Path) -> str:
    """The source path as recorded in the output: relative to SRC, so a moved dataset imports the same."""
    if path == src or not src.is_dir():
        return path.name
    return path.relative_to(src).as_posix()


def task_name(default: str, opts: ImportOptions) -> str:
    name = opts.task or default
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        raise LftkError(f"task name {name!r} cannot be a dir name: pass --task NAME")
    return name


def default_instruction(task: str, opts: ImportOptions) -> str:
    return opts.instruction or task.replace("_", " ")


def per_frame_value(value) -> list | float | int | None:
    """An extra (joint angles, a pose) as JSON: floats rounded so the same source gives the same bytes."""
    arr = np.asarray(value)
    if arr.dtype.kind == "f":
        return np.round(arr.astype(np.float64), EXTRA_DIGITS).tolist()
    if arr.dtype.kind in "iub":
        return arr.tolist()
    return None  # strings, objects: not a per-frame number, left out


def source_rate(opts: ImportOptions, read: Fraction | float | None = None) -> Fraction | None:
    """--fps wins over what the source says (that is what it is for); Fraction keeps 29.97 exact."""
    rate = opts.fps if opts.fps is not None else read
    if rate is None or float(rate) <= 0:
        return None
    return rate if isinstance(rate, Fraction) else Fraction(str(rate))


# ---------------------------------------------------------------------------------------------- resampling


def select_frames(frames: Iterable[Frame], fps: Fraction | None) -> Iterator[Frame]:
    """For each toolkit tick t0, t0 + 1/10 s, ... up to the last source frame, the source frame nearest in time
    (ties go to the earlier one). Dropped frames are never loaded; a slower source repeats frames.
    Without a known rate every frame is kept."""
    if fps is None:
        yield from frames
        return
    step = Fraction(1, TOOLKIT_FPS)
    prev: tuple[Fraction, Frame] | None = None
    target = Fraction(0)
    for frame in frames:
        t = frame.time if frame.time is not None else Fraction(frame.index) / fps
        if prev is None:
            prev, target = (t, frame), t
            continue
        pt, pf = prev
        if t <= pt:
            raise BadSource(f"frame {frame.index}", f"timestamps do not increase ({float(t):.4f} s after {float(pt):.4f} s)")
        while target < t:  # every tick in [pt, t) lies between these two frames
            yield pf if target - pt <= t - target else frame
            target += step
        prev = (t, frame)
    if prev is not None and target == prev[0]:
        yield prev[1]


# ---------------------------------------------------------------------------------------------- episode writer


def _nest(extras: dict[str, list]) -> dict:
    """{"joint_action/left_arm": [...]} -> {"joint_action": {"left_arm": [...]}}; a bare key stays a list."""
    out: dict = {}
    for key, values in extras.items():
        head, _, rest = key.partition("/")
        if rest:
            out.setdefault(head, {})[rest] = values
        else:
            out[head] = values
    return out


def write_episode(src: EpisodeSource, ep_dir: Path, ctx: Context) -> dict:
    """Frames `<i>.jpg` and episode.json into `ep_dir` (created here); BadSource when the episode is unusable."""
    opts = ctx.opts
    ep_dir.mkdir(parents=True)
    picked: list[int] = []
    extras: dict[str, list] = {}
    first: tuple[int, tuple[int, int]] | None = None  # (source index, size) of the first frame
    extra: dict = {}
    for i, frame in enumerate(select_frames(src.frames, src.fps)):
        dst = ep_dir / f"{i}.jpg"
        if picked and frame.index == picked[-1]:
            # A repeated frame (slower source than 10 fps): same bytes, no decode; `extra` is still that frame's.
            shutil.copyfile(ep_dir / f"{i - 1}.jpg", dst)
        else:
            try:
                img, extra = frame.load()
            except LftkError as exc:  # images.py names the frame that would not decode
                raise BadSource(src.path, str(exc)) from None
            if first is None:
                first = (frame.index, img.size)
            elif img.size != first[1]:
                (w0, h0), (w, h) = first[1], img.size
                raise BadSource(src.path, f"mixed resolutions: frame {first[0]} is {w0}x{h0}, frame {frame.index} is {w}x{h}")
            save_rgb(np.asarray(to_square_rgb(img, opts.resolution)), dst)
        for key, value in extra.items():
            extras.setdefault(key, []).append(value)
        picked.append(frame.index)
    n = len(picked)
    if n == 0:
        raise BadSource(src.path, "empty episode: no frames")
    if n <= opts.horizon:
        at = f" at {TOOLKIT_FPS} fps" if src.fps else ""
        raise BadSource(src.path, f"{n} frames{at}: too short for horizon {opts.horizon} (needs more than {opts.horizon})")
    for key in [k for k, v in extras.items() if len(v) != n]:
        ctx.ledger.warn(src.path, f"'{key}' is missing on some frames: left out of episode.json")
        del extras[key]
    with Image.open(ep_dir / "0.jpg") as im:
        w, h = im.size
    meta = {
        "task": src.task,
        "instruction": src.instruction,
        "fps": TOOLKIT_FPS,
        "source_fps": float(src.fps) if src.fps else None,
        "frames": n,
        "resolution": w if w == h else [w, h],
        "source": ctx.format,
        "source_path": relative_name(src.path, ctx.src),
        **src.meta,
    }
    if src.fps is None:
        meta["fps_assumed"] = True  # frames kept 1:1; the summary says so and how to fix it (--fps)
    elif picked != list(range(n)):
        meta["source_frames"] = picked  # which source frame each output frame is
    meta.update(_nest(extras))
    (ep_dir / "episode.json").write_text(json.dumps(meta, separators=(",", ":")) + "\n")
    return meta


# ---------------------------------------------------------------------------------------------- staging + driver


class Staging(AbstractContextManager):
    """OUT is written under a hidden temp dir beside it and renamed at the end: complete or absent.
    Any exception (including --strict's first problem and Ctrl-C) removes the temp dir."""

    def __init__(self, out: Path):
        self.out = Path(out)
        _check_out(self.out)
        self.tmp = atomic.staging_dir(self.out)  # also clears what a killed import of OUT left

    def publish(self, summary_name: str, summary: dict) -> None:
        (self.tmp / summary_name).write_text(json.dumps(summary, indent=2) + "\n")
        _publish(self.tmp, self.out)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def import_episodes(reader: EpisodeFormat, ctx: Context, out: Path) -> dict:
    """Every episode `reader` finds under ctx.src, written as OUT/<task>/episode<k> (k counts per task in source
    order); returns the summary written to OUT/import.json."""
    sources = reader.find(ctx)
    written: dict[str, list[dict]] = {}
    with Staging(out) as stage:
        for path in sources:
            ep_dir = None
            try:
                with reader.open_episode(ctx.inside(path), ctx) as src:
                    ep_dir = stage.tmp / src.task / f"episode{len(written.get(src.task, []))}"
                    meta = write_episode(src, ep_dir, ctx)
            except LftkError:
                raise  # --strict, or a bad option: stop (Staging removes what was written)
            except Exception as exc:  # BadSource, or a library error a reader let through: a skip, not a crash half-way
                if ep_dir is not None:
                    shutil.rmtree(ep_dir, ignore_errors=True)
                ctx.ledger.skip(*_where(path, exc))
                continue
            written.setdefault(meta["task"], []).append(meta)
        if not written:
            why = f"; first: {ctx.ledger.skipped[0]['path']}: {ctx.ledger.skipped[0]['reason']}" if ctx.ledger.skipped else ""
            raise LftkError(f"{ctx.src}: no usable episode among {len(sources)} source(s){why}")
        summary = _summary(ctx, written, len(sources))
        stage.publish(SUMMARY_NAME, summary)
    return summary


def _where(path: Path, exc: Exception) -> tuple[str, str]:
    """(what to name, why) for a failed episode: the file inside it when the reader knows it."""
    if not isinstance(exc, BadSource):
        log.debug("%s: %s", path, exc, exc_info=exc)
        return str(path), f"unreadable ({type(exc).__name__}: {exc})"
    return (exc.path if exc.path.startswith(str(path)) else f"{path} ({exc.path})"), exc.reason


def _summary(ctx: Context, written: dict[str, list[dict]], n_sources: int) -> dict:
    metas = [m for ms in written.values() for m in ms]
    resolutions = sorted({json.dumps(m["resolution"]) for m in metas})
    if len(resolutions) > 1:
        log.warning("episodes have mixed resolutions %s: pass --resolution N to make them one size", ", ".join(resolutions))
    assumed = sum(1 for m in metas if m.get("fps_assumed"))
    if assumed:
        log.warning(
            "%s: %d episode(s) carry no frame rate: frames kept 1:1 and taken as %d fps; if they were recorded at "
            "another rate, import again with --fps RATE so that horizon %d still means %g s",
            ctx.src, assumed, TOOLKIT_FPS, ctx.opts.horizon, ctx.opts.horizon / TOOLKIT_FPS,
        )
    opts = ctx.opts
    return {
        "format": "lftk-import",
        "version": 1,
        "kind": "episodes",
        "source_format": ctx.format,
        "source": str(ctx.src.resolve()),
        "options": {"camera": opts.camera, "episodes": opts.episodes, "fps": opts.fps, "resolution": opts.resolution, "horizon": opts.horizon,
                    "instruction": opts.instruction, "task": opts.task},
        "sources": n_sources,
        "episodes": len(metas),
        "frames": sum(m["frames"] for m in metas),
        "per_task": {t: {"episodes": len(ms), "frames": sum(m["frames"] for m in ms)} for t, ms in sorted(written.items())},
        "resolutions": [json.loads(r) for r in resolutions],
        "fps_assumed_episodes": assumed,
        "skipped": ctx.ledger.skipped,
        "warnings": ctx.ledger.warnings,
    }
