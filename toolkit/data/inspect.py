"""`lftk data inspect DIR`: what a pair dir or an episodes dir holds, and a contact sheet to look at.

Also home of `contact_sheet`, the one labelled image grid (the evaluator's grid.png uses it too).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lftk.data.episodes import scan_episodes
from lftk.data.images import load_rgb
from lftk.data.pairset import PairSet, read_summary, split_names
from lftk.errors import LftkError

log = logging.getLogger(__name__)

SHEET_ROWS = 6
RESOLUTION_PROBES = 256  # image headers read per split: enough to catch mixed sizes, fast on 100k samples
EPISODE_PREVIEW_OFFSET = 100  # the default horizon: an episode's sheet shows frame 0 and frame 100 (or its last)
_GAP, _TEXT_H = 4, 14
_BG, _FG = (24, 24, 24), (235, 235, 235)


def spread_indices(n: int, k: int | None) -> list[int]:
    """Up to k indices evenly spread over range(n) (first and last included): a deterministic subsample."""
    if k is None or k >= n:
        return list(range(n))
    if k <= 0:
        return []
    return sorted(set(np.linspace(0, n - 1, k).round().astype(int).tolist()))


def _fit_text(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-1]
    return text


def _cell(arr: np.ndarray, cell: int) -> Image.Image:
    img = Image.fromarray(np.asarray(arr, dtype=np.uint8), "RGB")
    if img.size == (cell, cell):
        return img
    # Nearest when enlarging, so a 64 px prediction is shown as it is, not smoothed into looking better.
    upscale = cell > max(img.size)
    return img.resize((cell, cell), Image.NEAREST if upscale else Image.BICUBIC)


def contact_sheet(
    rows: Sequence[Sequence[np.ndarray]],
    col_labels: Sequence[str],
    row_labels: Sequence[str] | None = None,
    cell: int = 128,
) -> Image.Image:
    """A grid of (H, W, 3) uint8 frames, one `cell` px square each, column titles on top, a caption per row."""
    if not rows:
        raise ValueError("contact sheet needs at least one row")
    n_cols = len(col_labels)
    font = ImageFont.load_default()
    width = _GAP + n_cols * (cell + _GAP)
    row_h = (_TEXT_H if row_labels else 0) + cell + _GAP
    sheet = Image.new("RGB", (width, _TEXT_H + _GAP + len(rows) * row_h), _BG)
    draw = ImageDraw.Draw(sheet)
    for c, label in enumerate(col_labels):
        draw.text((_GAP + c * (cell + _GAP), 2), _fit_text(draw, label, cell, font), fill=_FG, font=font)
    y = _TEXT_H + _GAP
    for r, frames in enumerate(rows):
        if row_labels:
            draw.text((_GAP, y), _fit_text(draw, row_labels[r], width - 2 * _GAP, font), fill=_FG, font=font)
            y += _TEXT_H
        for c, frame in enumerate(frames[:n_cols]):
            sheet.paste(_cell(frame, cell), (_GAP + c * (cell + _GAP), y))
        y += cell + _GAP
    return sheet


def _sizes(paths: Sequence[Path]) -> set[str]:
    sizes = set()
    for p in paths:
        with Image.open(p) as im:  # header only: no decode
            sizes.add(f"{im.width}x{im.height}")
    return sizes


def _is_pair_dir(path: Path) -> bool:
    return (path / "pairs.json").is_file() or next(path.glob("*/*/prompt.json"), None) is not None


def _inspect_pairs(path: Path, n_rows: int) -> tuple[dict, list, list]:
    splits, tasks, horizons, sizes, everything = {}, {}, set(), set(), []
    for split in split_names(path):
        ps = PairSet(path, split)
        counts = ps.task_counts()
        splits[split] = {"samples": len(ps), "tasks": counts}
        for task, n in counts.items():
            tasks.setdefault(task, {})[split] = n
        horizons.update(p.prompt["horizon"] for p in ps if "horizon" in p.prompt)
        probe = [ps[i] for i in spread_indices(len(ps), RESOLUTION_PROBES)]
        sizes |= _sizes([p.current for p in probe] + [p.future for p in probe])
        everything.extend((split, p) for p in ps)
    info = {
        "kind": "pairs",
        "splits": splits,
        "tasks": dict(sorted(tasks.items())),
        "n_samples": len(everything),
        "resolutions": sorted(sizes),
        "horizons": sorted(horizons),
        "summary": read_summary(path),
    }
    picks = [everything[i] for i in spread_indices(len(everything), n_rows)]
    rows = [[load_rgb(p.current), load_rgb(p.future)] for _, p in picks]
    labels = [f"{split}/{p.name}: {p.instruction}" for split, p in picks]
    return info, rows, labels


def _inspect_episodes(path: Path, n_rows: int) -> tuple[dict, list, list]:
    scan = scan_episodes(path)
    tasks: dict[str, dict] = {}
    for ep in scan.episodes:
        t = tasks.setdefault(ep.task, {"episodes": 0, "frames": 0})
        t["episodes"] += 1
        t["frames"] += ep.n_frames
    lengths = [ep.n_frames for ep in scan.episodes]
    info = {
        "kind": "episodes",
        "tasks": dict(sorted(tasks.items())),
        "n_episodes": len(scan.episodes),
        "frames_per_episode": {"min": min(lengths), "max": max(lengths)},
        "resolutions": sorted(_sizes([ep.frame_paths[0] for ep in scan.episodes])),
        "fps": sorted({ep.meta["fps"] for ep in scan.episodes if "fps" in ep.meta}),
        "skipped": [{"path": str(s.path), "reason": s.reason} for s in scan.skipped],
    }
    picks = [scan.episodes[i] for i in spread_indices(len(scan.episodes), n_rows)]
    rows, labels = [], []
    for ep in picks:
        later = min(EPISODE_PREVIEW_OFFSET, ep.n_frames - 1)
        rows.append([load_rgb(ep.frame_paths[0]), load_rgb(ep.frame_paths[later])])
        labels.append(f"{ep.key} f0 -> f{later}: {ep.instruction}")
    return info, rows, labels


def inspect_dir(path: Path | str, out: Path | str | None = None, n_rows: int = SHEET_ROWS) -> dict:
    """Counts per task and split, resolutions, horizons; writes a contact sheet PNG (current | future).

    The sheet goes to `out`, or beside the dir as `<name>_sheet.png` (never inside it: a pair dir
    stays exactly what `make_pairs` wrote).
    """
    path = Path(path).resolve()
    if not path.is_dir():
        raise LftkError(f"{path}: not a dir")
    if _is_pair_dir(path):
        info, rows, labels = _inspect_pairs(path, n_rows)
    else:
        info, rows, labels = _inspect_episodes(path, n_rows)
    info["path"] = str(path)
    sheet_path = Path(out) if out else path.parent / f"{path.name}_sheet.png"
    if rows:
        sheet_path.parent.mkdir(parents=True, exist_ok=True)
        contact_sheet(rows, ["current", "future"], labels).save(sheet_path)
        info["contact_sheet"] = str(sheet_path)
    else:
        info["contact_sheet"] = None
    tasks, sizes = ", ".join(info["tasks"]), ", ".join(info["resolutions"])
    log.info("%s: %s; tasks %s; resolutions %s; sheet %s", path, info["kind"], tasks, sizes, info["contact_sheet"])
    return info
