"""Episodes -> (current, future) pairs in InstructPix2Pix's sample-dir format, split by episode.

Splits are drawn per episode, never per frame: neighbouring frames of one episode are nearly
identical, so a frame-level split would leak test images into training. Within each task the
episodes are shuffled with a seed derived from (seed, task), so adding a task leaves the other
tasks' splits unchanged, and every task with >= 3 episodes lands in every split.

Horizons: one (`--horizon 100`) or several (`--horizon 25,50,100`). With several, each start frame
still gives one pair, whose horizon is drawn from the horizons that fit in its episode (i + h < the
episode's length), with a random stream seeded by (seed, episode): the same seed gives the same
pairs, and adding an episode leaves the others' draws unchanged. Start frames are those that fit
the shortest horizon, so late frames of an episode draw only among the shorter horizons and an
episode shorter than the longest horizon still gives pairs. prompt.json records each pair's own
horizon; a template with `{horizon}` states it to the model (lftk.data.pairset.format_prompt).

Output (written to a temp dir beside OUT, renamed at the end so OUT is complete or absent):

    OUT/pairs.json                       summary: counts, settings, which episode went where
    OUT/<split>/<task>__episode<k>__f<i:04d>/000000_0.jpg   current frame i
                                          000000_1.jpg   future frame i + that pair's horizon
                                          prompt.json
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from lftk import atomic
from lftk.data.episodes import Episode, scan_episodes
from lftk.data.images import open_image, save_rgb, to_square_rgb
from lftk.errors import LftkError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
PAIRS_SUMMARY = "pairs.json"
CURRENT_NAME = "000000_0.jpg"  # InstructPix2Pix's names: input image ...
FUTURE_NAME = "000000_1.jpg"  # ... and edited (here: future) image
PROMPT_NAME = "prompt.json"
_JPEG_SUFFIXES = (".jpg", ".jpeg")


def parse_split(split: Sequence[float] | str) -> tuple[float, float, float]:
    """(train, val, test) ratios from a tuple or "0.8,0.1,0.1"; they must be >= 0 and sum to 1."""
    if isinstance(split, str):
        try:
            split = [float(x) for x in split.split(",")]
        except ValueError:
            raise LftkError(f"--split {split!r}: expected three numbers like 0.8,0.1,0.1") from None
    ratios = tuple(float(x) for x in split)
    if len(ratios) != 3 or any(not math.isfinite(r) or r < 0 for r in ratios):
        raise LftkError(f"split {split!r}: expected three ratios >= 0 (train, val, test)")
    if abs(sum(ratios) - 1.0) > 1e-6:
        raise LftkError(f"split {split!r}: ratios sum to {sum(ratios):g}, not 1")
    if ratios[0] <= 0:
        raise LftkError(f"split {split!r}: the train ratio must be > 0")
    return ratios  # type: ignore[return-value]


def parse_horizons(horizon: int | Sequence[int] | str) -> tuple[int, ...]:
    """Sorted horizons from 100, [25, 50, 100] or "25,50,100"; each a whole number of frames >= 1, no repeats."""
    if isinstance(horizon, str):
        try:
            values = [int(x) for x in horizon.split(",")]
        except ValueError:
            raise LftkError(f"--horizon {horizon!r}: expected frames ahead, one number or a comma list like 25,50,100") from None
    elif isinstance(horizon, int):
        values = [horizon]
    else:
        values = list(horizon)
    if not values or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in values):
        raise LftkError(f"horizon {horizon!r}: every horizon must be a whole number of frames >= 1")
    if len(set(values)) != len(values):
        raise LftkError(f"horizon {horizon!r}: a horizon is repeated (each is drawn with equal chance; list it once)")
    return tuple(sorted(values))


def draw_horizons(ep: Episode, horizons: Sequence[int], stride: int, seed: int) -> list[tuple[int, int]]:
    """(start frame, horizon) pairs of one episode: starts fit the shortest horizon; each draws one
    of the horizons that fit it, from a stream seeded by (seed, episode) alone."""
    starts = pair_starts(ep.n_frames, min(horizons), stride)
    if len(horizons) == 1:
        return [(i, horizons[0]) for i in starts]
    rng = random.Random(f"{seed}/horizon/{ep.key}")
    return [(i, rng.choice([h for h in horizons if i + h < ep.n_frames])) for i in starts]


def pair_starts(n_frames: int, horizon: int, stride: int) -> list[int]:
    """Current-frame indices i = 0, stride, 2*stride, ... with i + horizon < n_frames."""
    return list(range(0, max(n_frames - horizon, 0), stride))


def sample_name(ep: Episode, frame: int) -> str:
    return f"{ep.task}__{ep.name}__f{frame:04d}"


def _allocate(n: int, ratios: Sequence[float]) -> list[int]:
    """Episode counts per split: largest remainder of n * ratio, then >= 1 in every positive split when n allows."""
    raw = [n * r for r in ratios]
    counts = [math.floor(x) for x in raw]
    for k in sorted(range(len(raw)), key=lambda k: (counts[k] - raw[k], k))[: n - sum(counts)]:
        counts[k] += 1
    wanted = [k for k, r in enumerate(ratios) if r > 0]
    if n >= len(wanted):
        for k in wanted:
            if counts[k] == 0:
                donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
                counts[donor] -= 1
                counts[k] += 1
    return counts


def assign_splits(episodes: Sequence[Episode], ratios: Sequence[float], seed: int) -> dict[str, list[Episode]]:
    """Episodes per split: deterministic in `seed`, stratified by task, no episode in two splits."""
    by_task: dict[str, list[Episode]] = {}
    for ep in episodes:
        by_task.setdefault(ep.task, []).append(ep)
    # per task: split name -> episodes
    table: dict[str, dict[str, list[Episode]]] = {}
    for task, eps in sorted(by_task.items()):
        order = list(eps)
        random.Random(f"{seed}/{task}").shuffle(order)
        n_train, n_val, _ = _allocate(len(order), ratios)
        cut = n_train + n_val
        table[task] = {"train": order[:n_train], "val": order[n_train:cut], "test": order[cut:]}

    # Tasks with 1-2 episodes put them all in train; with >= 3 episodes overall, borrow one from
    # the fullest split so that val and test are never empty.
    wanted = [s for s, r in zip(SPLITS, ratios) if r > 0]
    total = len(episodes)

    def size(split: str) -> int:
        return sum(len(t[split]) for t in table.values())

    while total >= len(wanted) and any(size(s) == 0 for s in wanted):
        empty = next(s for s in wanted if size(s) == 0)
        donor_split = max(SPLITS, key=size)
        donor_task = max(table, key=lambda t: len(table[t][donor_split]))
        table[donor_task][empty].append(table[donor_task][donor_split].pop())

    rank = {e.key: i for i, e in enumerate(episodes)}  # the scan's order: by task, then episode number
    out = {s: sorted((e for t in table.values() for e in t[s]), key=lambda e: rank[e.key]) for s in SPLITS}
    empty = [s for s in wanted if not out[s]]
    if empty:
        log.warning("only %d usable episode(s): split(s) %s are empty", total, ", ".join(empty))
    for task, splits in table.items():
        missing = [s for s in wanted if not splits[s]]
        if missing and not empty:
            n = sum(map(len, splits.values()))
            log.warning("task %s (%d episode(s)) has none in %s", task, n, ", ".join(missing))
    return out


def _copy_frame(src: Path, dst: Path) -> None:
    if src.suffix.lower() in _JPEG_SUFFIXES:
        shutil.copyfile(src, dst)  # same bytes: re-encoding a JPEG would add a second loss
    else:
        save_rgb(np.asarray(to_square_rgb(open_image(src), None)), dst)


def _write_sample(ep: Episode, frame: int, horizon: int, split_dir: Path) -> None:
    sample = split_dir / sample_name(ep, frame)
    sample.mkdir()
    _copy_frame(ep.frame_paths[frame], sample / CURRENT_NAME)
    _copy_frame(ep.frame_paths[frame + horizon], sample / FUTURE_NAME)
    prompt = {
        "instruction": ep.instruction,
        "horizon": horizon,
        "task": ep.task,
        "episode": ep.name,
        "frame": frame,
        "future_frame": frame + horizon,
        "source_episode_dir": str(ep.path.resolve()),
    }
    (sample / PROMPT_NAME).write_text(json.dumps(prompt, indent=2))


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LftkError(f"{out} already exists and is not empty; choose a new OUT or delete it")


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished temp dir to OUT (atomic on one filesystem)."""
    _check_out(out)
    if out.exists():
        out.rmdir()
    tmp.rename(out)


def _warn_uneven_tasks(root, episodes) -> None:
    """A task with fewer episodes than the others is what a stopped `lftk data sim` leaves: say so."""
    per_task: dict[str, int] = {}
    for ep in episodes:
        per_task[ep.task] = per_task.get(ep.task, 0) + 1
    if len(set(per_task.values())) > 1:
        most = max(per_task.values())
        short = ", ".join(f"{t} {n}" for t, n in sorted(per_task.items()) if n < most)
        log.warning("%s: tasks have unequal episode counts (%s; others %d): if a `lftk data sim` was stopped, "
                    "run it again to finish the missing episodes", root, short, most)


def make_pairs(
    episodes_root: Path | str,
    out: Path | str,
    horizon: int | Sequence[int] | str = 100,
    stride: int = 10,
    split: Sequence[float] | str = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> dict:
    """Write the pair dir OUT from the episodes under `episodes_root`; returns the pairs.json summary.

    `horizon`: one horizon, or several (a list or "25,50,100") to draw one per pair (module doc)."""
    horizons = parse_horizons(horizon)
    if stride < 1:
        raise LftkError(f"stride ({stride}) must be >= 1")
    shortest = horizons[0]
    ratios = parse_split(split)
    out = Path(out)
    _check_out(out)
    scan = scan_episodes(episodes_root)
    skipped = [{"path": str(s.path), "reason": s.reason} for s in scan.skipped]
    _warn_uneven_tasks(episodes_root, scan.episodes)
    usable = []
    for ep in scan.episodes:
        if pair_starts(ep.n_frames, shortest, stride):
            usable.append(ep)
        else:
            reason = f"{ep.n_frames} frames: too short for horizon {shortest}"
            log.warning("%s: skipped: %s", ep.path, reason)
            skipped.append({"path": str(ep.path), "reason": reason})
    if not usable:
        raise LftkError(f"{episodes_root}: no episode is longer than the horizon ({shortest} frames)")
    splits = assign_splits(usable, ratios, seed)

    tmp = atomic.staging_dir(out)  # also clears what a killed run for OUT left
    counts, per_task = {}, {}
    per_horizon = {str(h): dict.fromkeys(SPLITS, 0) for h in horizons}
    try:
        for split_name, eps in splits.items():
            split_dir = tmp / split_name
            split_dir.mkdir()  # empty splits still get a dir: readers see "0 samples", not "missing"
            n_split = 0
            for ep in eps:
                drawn = draw_horizons(ep, horizons, stride, seed)
                for i, h in drawn:
                    _write_sample(ep, i, h, split_dir)
                    per_horizon[str(h)][split_name] += 1
                per_task.setdefault(ep.task, dict.fromkeys(SPLITS, 0))[split_name] += len(drawn)
                n_split += len(drawn)
            counts[split_name] = {"pairs": n_split, "episodes": len(eps)}
        summary = {
            "format": "lftk-pairs",
            "version": 1,
            "source": str(Path(episodes_root).resolve()),
            # "horizon" only when there is one: a reader of it never mistakes a mix for one offset
            **({"horizon": horizons[0]} if len(horizons) == 1 else {}),
            "horizons": list(horizons),
            "per_horizon": per_horizon,
            "stride": stride,
            "split_ratios": dict(zip(SPLITS, ratios)),
            "seed": seed,
            "n_pairs": sum(c["pairs"] for c in counts.values()),
            "counts": counts,
            "per_task": dict(sorted(per_task.items())),
            "episodes": {s: [e.key for e in eps] for s, eps in splits.items()},
            "skipped": skipped,
        }
        (tmp / PAIRS_SUMMARY).write_text(json.dumps(summary, indent=2))
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "%d pairs (%s) from %d episodes written to %s",
        summary["n_pairs"],
        ", ".join(f"{s} {c['pairs']}" for s, c in counts.items()),
        len(usable),
        out,
    )
    return summary
