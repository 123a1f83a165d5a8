"""LeRobot datasets written from the documented layouts (v3.0 and v2.1), small enough for tests.

Each frame is a flat colour that says what it is: red = 40 + 60 x episode, green = 20 + 12 x frame,
blue = 60 + 120 x camera (0 or 1). A frame taken from a neighbouring episode, or one frame off,
shows in the colour after mpeg4, resizing and JPEG. Per-frame `observation.state` is
[episode, frame] and `action` [frame / 10], so episode.json can be checked to the value.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

FPS = 10
SIZE = 32  # mpeg4 wants even sides


def colour(ep: int, k: int, cam: int = 0) -> tuple[int, int, int]:
    return 40 + 60 * ep, 20 + 12 * k, 60 + 120 * cam


def frame(ep: int, k: int, cam: int = 0) -> np.ndarray:
    return np.full((SIZE, SIZE, 3), colour(ep, k, cam), np.uint8)


def _write_mp4(path: Path, frames: list[np.ndarray]) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "1"}  # near-lossless: colours survive
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _features(cameras: list[str], dtype: str) -> dict:
    feats = {cam: {"dtype": dtype, "shape": [SIZE, SIZE, 3], "names": ["height", "width", "channels"]} for cam in cameras}
    feats.update({
        "observation.state": {"dtype": "float32", "shape": [2], "names": ["episode", "frame"]},
        "action": {"dtype": "float32", "shape": [1], "names": ["a"]},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    })
    return feats


def _data_rows(ep: int, length: int, task_index: int, start: int, cameras: list[str] | None) -> list[dict]:
    rows = []
    for k in range(length):
        row = {
            "observation.state": [float(ep), float(k)], "action": [k / 10], "timestamp": k / FPS,
            "frame_index": k, "episode_index": ep, "index": start + k, "task_index": task_index,
        }
        for c, cam in enumerate(cameras or []):  # image features: the PNG in the parquet
            row[cam] = {"bytes": _png(frame(ep, k, c)), "path": None}
        rows.append(row)
    return rows


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def write_v3(root: Path, lengths: list[int], tasks: list[str], cameras=("observation.images.top",),
             dtype: str = "video") -> Path:
    """A v3.0 dataset: every episode in one data parquet and, per camera, one mp4 back to back.
    `tasks[i]` is episode i's task."""
    cameras = list(cameras)
    task_ids = {t: i for i, t in enumerate(dict.fromkeys(tasks))}
    info = {
        "codebase_version": "v3.0", "robot_type": "test", "fps": FPS, "chunks_size": 1000,
        "total_episodes": len(lengths), "total_frames": sum(lengths), "total_tasks": len(task_ids),
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4" if dtype == "video" else None,
        "features": _features(cameras, dtype),
    }
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=2))
    _write_parquet(root / "meta" / "tasks.parquet", [{"task": t, "task_index": i} for t, i in task_ids.items()])
    data, episodes, start = [], [], 0
    for ep, (n, task) in enumerate(zip(lengths, tasks)):
        data += _data_rows(ep, n, task_ids[task], start, cameras if dtype == "image" else None)
        row = {"episode_index": ep, "tasks": [task], "length": n, "data/chunk_index": 0, "data/file_index": 0,
               "dataset_from_index": start, "dataset_to_index": start + n}
        if dtype == "video":
            for cam in cameras:
                row.update({f"videos/{cam}/chunk_index": 0, f"videos/{cam}/file_index": 0,
                            f"videos/{cam}/from_timestamp": start / FPS, f"videos/{cam}/to_timestamp": (start + n) / FPS})
        episodes.append(row)
        start += n
    _write_parquet(root / "data" / "chunk-000" / "file-000.parquet", data)
    _write_parquet(root / "meta" / "episodes" / "chunk-000" / "file-000.parquet", episodes)
    if dtype == "video":
        for c, cam in enumerate(cameras):
            frames = [frame(ep, k, c) for ep, n in enumerate(lengths) for k in range(n)]
            _write_mp4(root / "videos" / cam / "chunk-000" / "file-000.mp4", frames)
    return root


def write_v21(root: Path, lengths: list[int], tasks: list[str], cameras=("observation.images.top",),
              dtype: str = "video") -> Path:
    """A v2.1 dataset: episodes.jsonl and tasks.jsonl, one parquet per episode, and one mp4 per episode
    and camera (dtype "video") or the frames' PNGs in the parquet (dtype "image")."""
    cameras = list(cameras)
    task_ids = {t: i for i, t in enumerate(dict.fromkeys(tasks))}
    info = {
        "codebase_version": "v2.1", "robot_type": "test", "fps": FPS, "chunks_size": 1000,
        "total_episodes": len(lengths), "total_frames": sum(lengths),
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4" if dtype == "video" else None,
        "features": _features(cameras, dtype),
    }
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=2))
    (root / "meta" / "tasks.jsonl").write_text("".join(json.dumps({"task_index": i, "task": t}) + "\n" for t, i in task_ids.items()))
    (root / "meta" / "episodes.jsonl").write_text(
        "".join(json.dumps({"episode_index": ep, "tasks": [t], "length": n}) + "\n" for ep, (n, t) in enumerate(zip(lengths, tasks)))
    )
    start = 0
    for ep, (n, task) in enumerate(zip(lengths, tasks)):
        rows = _data_rows(ep, n, task_ids[task], start, cameras if dtype == "image" else None)
        _write_parquet(root / "data" / "chunk-000" / f"episode_{ep:06d}.parquet", rows)
        for c, cam in enumerate(cameras if dtype == "video" else []):
            _write_mp4(root / "videos" / "chunk-000" / cam / f"episode_{ep:06d}.mp4", [frame(ep, k, c) for k in range(n)])
        start += n
    return root
