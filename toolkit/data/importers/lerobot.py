"""LeRobot datasets (codebase v3.0 and v2.x), read with pyarrow and PyAV: one episode per LeRobot episode.

The layout is read from `meta/info.json`: the frame rate, the features (which are cameras: dtype
"video" or "image"), and the path templates of the data and video files.

- v3.0: `meta/episodes/chunk-*/file-*.parquet` has one row per episode (`episode_index`, `tasks`,
  `length`, where its rows lie in `data/chunk-*/file-*.parquet`, and per camera which mp4 under
  `videos/<camera>/` holds it, from `videos/<camera>/from_timestamp` to `to_timestamp`: one mp4
  holds many episodes back to back).
- v2.0 / v2.1: `meta/episodes.jsonl` and `meta/tasks.jsonl`; one parquet per episode, and one mp4
  per episode and camera.
- A camera of dtype "image" is stored in the parquet itself (PNG or JPEG bytes per row).

The instruction is the episode's (first) task string; the task dir is that string made a dir name
(--task overrides it). Video frames are those whose timestamps fall in the episode's span, which
must hold exactly `length` frames: an episode never takes a frame of its neighbour. The float
vectors of each frame (`observation.state`, `action`, ...) go into episode.json under their names.
"""

from __future__ import annotations

import json
import re
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from io import BytesIO
from pathlib import Path
from typing import Iterator

import av

from lftk.data.images import open_image
from lftk.data.importers.base import BadSource, Context, EpisodeSource, Frame, per_frame_value, source_rate
from lftk.errors import LftkError

V3, V2 = "v3.0", ("v2.0", "v2.1")
CAMERA_DTYPES = ("video", "image")
VECTOR_DTYPES = ("float32", "float64")
EPISODE_NAME = "episode_{:06d}"  # how an episode is named in warnings and episode.json's source_path
_NAME = re.compile(r"^episode_(\d+)$")


@dataclass(frozen=True)
class Dataset:
    root: Path
    version: str
    fps: Fraction
    camera: str
    camera_dtype: str  # "video" or "image"
    info: dict
    episodes: dict[int, dict]  # episode_index -> its row of the episodes table
    vectors: tuple[str, ...]  # per-frame float features kept in episode.json


# One import reads the metadata once (find, then every open_episode); the next import reads it afresh.
_OPEN: "weakref.WeakKeyDictionary[Context, Dataset]" = weakref.WeakKeyDictionary()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LftkError(f"{path}: not found: not a LeRobot dataset (its meta/info.json is missing)") from None
    except (OSError, ValueError) as exc:
        raise LftkError(f"{path}: not readable JSON ({exc})") from None


def _jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise LftkError(f"{path}: not found (a LeRobot v2 dataset lists its episodes there)") from None
    except (OSError, ValueError) as exc:
        raise LftkError(f"{path}: not readable JSON lines ({exc})") from None


def _episodes_v3(root: Path) -> list[dict]:
    import pyarrow.parquet as pq

    files = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise LftkError(f"{root / 'meta' / 'episodes'}: no chunk-*/file-*.parquet (the v3.0 episodes table)")
    rows = []
    for f in files:
        try:
            rows += pq.read_table(f).to_pylist()
        except Exception as exc:  # pyarrow raises its own types for a damaged file
            raise LftkError(f"{f}: not a readable parquet file ({exc})") from None
    return rows


def parse_episodes(spec: str | None, known: list[int]) -> list[int]:
    """`--episodes 0-9,15` -> those indices, in dataset order; None -> all. Unknown indices are refused."""
    if spec is None:
        return known
    wanted: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise LftkError(f"--episodes {spec!r}: '{part}' is not an index or a range like 0-9")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise LftkError(f"--episodes {spec!r}: range '{part}' runs backwards")
        wanted |= set(range(lo, hi + 1))
    missing = sorted(wanted - set(known))
    if missing:
        raise LftkError(
            f"--episodes {spec!r}: episode(s) {', '.join(map(str, missing[:10]))} not in this dataset "
            f"({len(known)} episodes, {min(known)}..{max(known)})"
        )
    return [i for i in known if i in wanted]


def open_dataset(ctx: Context) -> Dataset:
    if ctx in _OPEN:
        return _OPEN[ctx]
    root = ctx.src
    if not root.is_dir():
        raise LftkError(f"{root}: a LeRobot dataset is a dir (meta/, data/, videos/)")
    info = _read_json(root / "meta" / "info.json")
    version = str(info.get("codebase_version", ""))
    if version != V3 and version not in V2:
        raise LftkError(
            f"{root / 'meta' / 'info.json'}: codebase_version {version or '(none)'!r}: lftk reads LeRobot {V3} and "
            f"{', '.join(V2)} (convert older datasets with LeRobot's own conversion script)"
        )
    features = info.get("features") or {}
    cameras = [k for k, f in features.items() if isinstance(f, dict) and f.get("dtype") in CAMERA_DTYPES]
    if not cameras:
        raise LftkError(f"{root / 'meta' / 'info.json'}: no video or image feature: nothing to import")
    camera = ctx.opts.camera or cameras[0]
    if camera not in cameras:
        raise LftkError(f"--camera {camera!r}: not a camera of {root} (cameras: {', '.join(cameras)})")
    read = info.get("fps")
    fps = source_rate(ctx.opts, Fraction(str(read)) if read else None)
    if fps is None:
        raise LftkError(f"{root / 'meta' / 'info.json'}: no fps: pass --fps RATE")
    rows = _episodes_v3(root) if version == V3 else _jsonl(root / "meta" / "episodes.jsonl")
    episodes = {}
    for row in rows:
        if "episode_index" not in row or "length" not in row:
            raise LftkError(f"{root / 'meta'}: an episodes row without episode_index or length: {sorted(row)[:8]}")
        episodes[int(row["episode_index"])] = row
    vectors = tuple(
        k for k, f in features.items()
        if isinstance(f, dict) and f.get("dtype") in VECTOR_DTYPES and len(f.get("shape") or ()) == 1
        and k not in ("timestamp",)
    )
    ds = Dataset(root, version, fps, camera, features[camera]["dtype"], info, dict(sorted(episodes.items())), vectors)
    _OPEN[ctx] = ds
    return ds


def find(ctx: Context) -> list[Path]:
    ds = open_dataset(ctx)
    picked = parse_episodes(ctx.opts.episodes, list(ds.episodes))
    return [ctx.src / EPISODE_NAME.format(i) for i in picked]


def _task_dir(task: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", task.lower()).strip("_")[:64].rstrip("_")
    return slug or "task"


def _template(ds: Dataset, key: str, path: Path) -> str:
    value = ds.info.get(key)
    if not value:
        raise BadSource(path, f"meta/info.json has no {key}")
    return value


def _data_file(ds: Dataset, idx: int, row: dict, path: Path) -> Path:
    tpl = _template(ds, "data_path", path)
    if ds.version == V3:
        rel = tpl.format(chunk_index=int(row["data/chunk_index"]), file_index=int(row["data/file_index"]))
    else:
        rel = tpl.format(episode_chunk=idx // int(ds.info.get("chunks_size", 1000)), episode_index=idx)
    return ds.root / rel


def _video_span(ds: Dataset, idx: int, row: dict, path: Path) -> tuple[Path, float, float]:
    tpl = _template(ds, "video_path", path)
    cam = ds.camera
    if ds.version == V3:
        try:
            rel = tpl.format(video_key=cam, chunk_index=int(row[f"videos/{cam}/chunk_index"]),
                             file_index=int(row[f"videos/{cam}/file_index"]))
            return ds.root / rel, float(row[f"videos/{cam}/from_timestamp"]), float(row[f"videos/{cam}/to_timestamp"])
        except KeyError as exc:
            raise BadSource(path, f"the episodes table has no {exc.args[0]}") from None
    rel = tpl.format(episode_chunk=idx // int(ds.info.get("chunks_size", 1000)), video_key=cam, episode_index=idx)
    return ds.root / rel, 0.0, int(row["length"]) / float(ds.fps)


def _rows(ds: Dataset, idx: int, row: dict, path: Path, ctx: Context) -> dict[str, list]:
    """The episode's rows of its data parquet, ordered by frame_index: column -> values."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    file = ctx.inside(_data_file(ds, idx, row, path))
    if not file.is_file():
        raise BadSource(path, f"its data file {file.relative_to(ds.root)} is missing")
    wanted = ["episode_index", "frame_index", *ds.vectors] + ([ds.camera] if ds.camera_dtype == "image" else [])
    try:
        present = set(pq.read_schema(file).names)
        table = pq.read_table(file, columns=[c for c in wanted if c in present])
    except Exception as exc:
        raise BadSource(path, f"{file.relative_to(ds.root)}: not a readable parquet file ({exc})") from None
    if "episode_index" in table.column_names:
        table = table.filter(pc.equal(table["episode_index"], idx))
    if "frame_index" in table.column_names:
        table = table.sort_by("frame_index")
    if table.num_rows != int(row["length"]):
        raise BadSource(
            path, f"{file.relative_to(ds.root)} holds {table.num_rows} rows of it, the episodes table says length {row['length']}"
        )
    return table.to_pydict()


def _extras(ds: Dataset, rows: dict[str, list], k: int) -> dict:
    return {name: per_frame_value(rows[name][k]) for name in ds.vectors if name in rows}


def _video_frames(ds, container, stream, file: Path, start: float, stop: float, length: int, rows, path) -> Iterator[Frame]:
    """The frames stamped in [start, stop), half a frame's tolerance at each end: exactly `length`."""
    tol = 0.5 / float(ds.fps)
    if start > 0:
        container.seek(max(0, int((start - 1.0) / stream.time_base)), stream=stream, backward=True, any_frame=False)
    k = 0
    try:
        for frame in container.decode(stream):
            if frame.pts is None:
                raise BadSource(path, f"{file.name}: a frame without a timestamp")
            t = float(frame.pts * stream.time_base)
            if t < start - tol:
                continue
            if t >= stop - tol:
                break
            if k >= length:
                break
            yield Frame(k, None, lambda frame=frame, k=k: (frame.to_image(), _extras(ds, rows, k)))
            k += 1
    except av.error.FFmpegError as exc:
        raise BadSource(path, f"{file.name}: decoding stopped after {k} frame(s) of the episode ({exc}); truncated?") from None
    if k != length:
        raise BadSource(
            path, f"{file.name} holds {k} frames in {start:.3f}-{stop:.3f} s, the episodes table says length {length} "
            "(a truncated video, or timestamps outside the file)"
        )


def _image_frames(ds: Dataset, rows: dict[str, list], path: Path, ctx: Context) -> Iterator[Frame]:
    def load(k: int):
        cell = rows[ds.camera][k]
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if data is None and isinstance(cell, dict) and cell.get("path"):
            return open_image(ctx.inside(ds.root / cell["path"])), _extras(ds, rows, k)
        if not data:
            raise BadSource(path, f"frame {k}: no image bytes in column {ds.camera}")
        try:
            return open_image(BytesIO(data)), _extras(ds, rows, k)
        except LftkError as exc:
            raise BadSource(path, f"frame {k} of {ds.camera}: {exc}") from None

    for k in range(len(rows[ds.camera])):
        yield Frame(k, None, partial(load, k))


@contextmanager
def open_episode(path: Path, ctx: Context) -> Iterator[EpisodeSource]:
    ds = open_dataset(ctx)
    m = _NAME.match(path.name)
    if not m or int(m.group(1)) not in ds.episodes:
        raise BadSource(path, "not an episode of this dataset")
    idx = int(m.group(1))
    row = ds.episodes[idx]
    tasks = [str(t) for t in (row.get("tasks") or [])]
    if not tasks and not ctx.opts.instruction:
        raise BadSource(path, "no task string in the episodes table: pass --instruction")
    instruction = ctx.opts.instruction or tasks[0]
    task = ctx.opts.task or _task_dir(tasks[0] if tasks else instruction)
    meta = {"camera": ds.camera, "lerobot_version": ds.version, "episode_index": idx}
    if len(tasks) > 1:
        meta["instructions"] = tasks
    rows = _rows(ds, idx, row, path, ctx)
    length = int(row["length"])
    if ds.camera_dtype == "image":
        if ds.camera not in rows:
            raise BadSource(path, f"the data parquet has no column {ds.camera}")
        yield EpisodeSource(path, task, instruction, _image_frames(ds, rows, path, ctx), ds.fps, meta)
        return
    file, start, stop = _video_span(ds, idx, row, path)
    file = ctx.inside(file)
    if not file.is_file():
        raise BadSource(path, f"its video {file.relative_to(ds.root)} is missing")
    try:
        container = av.open(str(file))
    except (av.error.FFmpegError, OSError) as exc:
        raise BadSource(path, f"{file.name}: not a readable video ({exc})") from None
    try:
        if not container.streams.video:
            raise BadSource(path, f"{file.name}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = _video_frames(ds, container, stream, file, start, stop, length, rows, path)
        yield EpisodeSource(path, task, instruction, frames, ds.fps, {**meta, "video": file.relative_to(ds.root).as_posix()})
    finally:
        container.close()
