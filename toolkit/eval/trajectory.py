"""Trajectory metrics on simulated data: where the objects and the hands end up, in pixels.

A prediction has no states, so positions are read off the pixels, in the prediction and in the
true future frame alike, at the evaluated resolution (a figure at 64 px is half the one at 128 px):

- Objects, by colour. Each object's colour is in episode.json; the simulator lights top faces at
  about their nominal colour. A pixel belongs to an object when that object's colour is the
  nearest of: every object's colour, the table (the true frame's median colour) and the grey of
  the pixel's own brightness (arms, floor), and lies within COLOUR_TOLERANCE. The position is the
  centroid of those pixels. Error = distance between the centroid in the prediction and in the
  truth. An object is scored only if the truth shows it (>= MIN_PIXELS pixels, centroid near
  its projected state); if the prediction does not show it, it counts in `obj_missing`.
- Hands (end effectors), by appearance: they are white like the rest of the arm, so colour
  cannot tell them apart. A patch of the true frame around the hand's projected state is matched
  (least squared difference) against the prediction over a window spanning where the hand was and
  where it went, plus a margin. Error = distance from the best match to the true position, in
  whole pixels, at most the window's reach.

The states and the camera (toolkit/sim/camera.project) place things in the truth; real data
without states gets "n/a" with the reason.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

COLOUR_TOLERANCE = 80.0  # uint8 RGB distance: shading moves a lit face by ~20, a blend with the table by more
MIN_PIXELS = 3  # fewer true pixels: occluded or off-frame, its centroid means little
FOUND_FRACTION = 0.25  # a prediction shows an object if it has this share of the truth's pixel count
STATE_TOLERANCE = 1 / 10  # of the side: a true centroid farther than this from the projected state is not the object
PATCH_FRACTION = 1 / 16  # hand patch half-size, of the side: 4 px at 64
MARGIN_FRACTION = 1 / 8  # search margin around the hand's path, of the side

TRAJECTORY_KEYS = ("obj_err_px", "obj_missing", "ee_err_px")


@lru_cache(maxsize=64)
def _read_episode_json(path: str) -> dict | None:
    p = Path(path) / "episode.json"
    if not p.is_file():
        return None
    try:
        meta = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def episode_meta(prompt: dict) -> tuple[dict | None, str]:
    """(episode.json of a pair's source episode, "") or (None, why not)."""
    src = prompt.get("source_episode_dir")
    if not src:
        return None, "the pair does not name its source episode (no source_episode_dir in prompt.json)"
    meta = _read_episode_json(str(src))
    if meta is None:
        return None, f"{src}/episode.json is missing or unreadable"
    return meta, ""


def to_eval_pixels(colrow: np.ndarray, camera: dict, side: int) -> np.ndarray:
    """Pixel coordinates in the camera's frame -> in the frame as evaluated (centre-crop to a
    square, resize to `side`: the rule of lftk.data.images.to_square_rgb)."""
    w, h = camera["width"], camera["height"]
    sq = min(w, h)
    offset = np.array([(w - sq) / 2, (h - sq) / 2]) if w != h else np.zeros(2)
    offset = np.floor(offset)  # to_square_rgb crops at integer offsets
    return (np.asarray(colrow, dtype=np.float64) - offset) * (side / sq)


@dataclass(frozen=True)
class SceneState:
    """What the simulator knew at one frame, in evaluated pixels (col, row); None when off-frame."""

    objects: dict[str, np.ndarray | None]
    ee: dict[str, np.ndarray | None]
    colours: dict[str, np.ndarray]  # uint8-scale RGB


def scene_state(meta: dict, frame: int, side: int) -> tuple[SceneState | None, str]:
    from lftk.sim.camera import project

    states, camera = meta.get("states"), meta.get("camera")
    if not isinstance(states, list) or not states:
        return None, "the source episode has no simulator states (real data)"
    if not isinstance(camera, dict) or "view_matrix" not in camera:
        return None, "the source episode has no camera matrices"
    if not 0 <= frame < len(states):
        return None, f"the source episode has no state for frame {frame}"
    st = states[frame]

    def place(xyz) -> np.ndarray | None:
        px = to_eval_pixels(project([xyz[:3]], camera)[0], camera, side)
        return px if np.all(np.isfinite(px)) and np.all((px >= 0) & (px < side)) else None

    colours = {n: np.clip(np.asarray(o["color"], float) * 255.0, 0, 255) for n, o in meta.get("objects", {}).items()}
    objects = {n: place(s) for n, s in st.get("objects", {}).items() if n in colours}
    ee = {n: place(p) for n, p in st.get("ee", {}).items()}
    return SceneState(objects, ee, colours), ""


# ------------------------------------------------------------------------------------ locating


def colour_masks(frame: np.ndarray, refs: dict[str, np.ndarray], table: np.ndarray) -> dict[str, np.ndarray]:
    """Per object, (H, W) bool: pixels whose nearest reference colour is the object's (see module doc)."""
    x = frame.astype(np.float64)  # (H, W, 3)
    names = list(refs)
    palette = np.stack([refs[n] for n in names] + [table])  # (K + 1, 3)
    dist = np.linalg.norm(x[:, :, None, :] - palette[None, None], axis=-1)  # (H, W, K + 1)
    grey = np.linalg.norm(x - x.mean(axis=-1, keepdims=True), axis=-1)  # distance to the grey axis
    dist = np.concatenate([dist, grey[..., None]], axis=-1)  # (H, W, K + 2)
    nearest = dist.argmin(axis=-1)
    return {n: (nearest == k) & (dist[..., k] < COLOUR_TOLERANCE) for k, n in enumerate(names)}


def centroid(mask: np.ndarray) -> np.ndarray | None:
    """(col, row) of a mask's centre in continuous pixel coordinates (pixel (c, r) spans [c, c+1))."""
    rows, cols = np.nonzero(mask)
    if not len(rows):
        return None
    return np.array([cols.mean() + 0.5, rows.mean() + 0.5])


def match_patch(frame: np.ndarray, template: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Integer (col, row) in [lo, hi] where the patch of `frame` centred there (edge-padded) differs
    least from `template`, in summed squared difference."""
    from scipy.signal import fftconvolve

    half = template.shape[0] // 2
    (c0, r0), (c1, r1) = lo, hi
    padded = np.pad(frame.astype(np.float64), ((half, half), (half, half), (0, 0)), mode="edge")
    region = padded[r0 : r1 + 2 * half + 1, c0 : c1 + 2 * half + 1]  # every patch centred in the window
    t = template.astype(np.float64)
    # SSD = sum(F^2) - 2 sum(F T) + sum(T^2); the cross term by FFT, sum(F^2) by an integral image.
    cross = sum(fftconvolve(region[..., ch], t[::-1, ::-1, ch], mode="valid") for ch in range(t.shape[-1]))
    sq = np.pad((region * region).sum(axis=-1), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    k = 2 * half + 1
    f2 = sq[k:, k:] - sq[:-k, k:] - sq[k:, :-k] + sq[:-k, :-k]  # (rows, cols) box sums
    ssd = f2 - 2.0 * cross + (t * t).sum()
    r, c = np.unravel_index(int(ssd.argmin()), ssd.shape)
    return np.array([c0 + c, r0 + r])


# ------------------------------------------------------------------------------------- targets


@dataclass
class TrajectoryTarget:
    """Everything about one true future frame that a prediction is scored against."""

    side: int
    refs: dict[str, np.ndarray]  # object -> reference colour
    table: np.ndarray
    truth_xy: dict[str, np.ndarray]  # objects the truth shows -> located centroid
    truth_px: dict[str, int]
    hands: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]  # arm -> template, true px, lo, hi
    detail: dict = field(default_factory=dict)  # per object / arm: truth position, motion, or why n/a

    def locate(self, frame: np.ndarray) -> dict[str, tuple[np.ndarray | None, int]]:
        masks = colour_masks(frame, self.refs, self.table)
        return {n: (centroid(m), int(m.sum())) for n, m in masks.items()}

    def score(self, pred: np.ndarray) -> tuple[dict, dict]:
        """({"obj_err_px", "obj_missing", "ee_err_px"} with None where n/a, {name: error or None})."""
        found = self.locate(pred)
        errors: dict[str, float | None] = {}
        for name, truth in self.truth_xy.items():
            xy, count = found[name]
            ok = xy is not None and count >= max(1, math.ceil(FOUND_FRACTION * self.truth_px[name]))
            errors[name] = float(np.linalg.norm(xy - truth)) if ok else None
        for arm, (template, true_px, lo, hi) in self.hands.items():
            errors[arm] = float(np.linalg.norm(match_patch(pred, template, lo, hi) - true_px))
        obj = [errors[n] for n in self.truth_xy]
        hit = [e for e in obj if e is not None]
        ee = [errors[a] for a in self.hands]
        metrics = {
            "obj_err_px": float(np.mean(hit)) if hit else None,
            "obj_missing": 1.0 - len(hit) / len(obj) if obj else None,
            "ee_err_px": float(np.mean(ee)) if ee else None,
        }
        return metrics, errors


def _distinct_colours(colours: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    refs, na = {}, {}
    for name, c in colours.items():
        twin = next((o for o, d in colours.items() if o != name and np.linalg.norm(d - c) < COLOUR_TOLERANCE / 4), None)
        if twin is not None:
            na[name] = f"shares its colour with {twin}"
        elif np.linalg.norm(c - c.mean()) < COLOUR_TOLERANCE / 2:
            na[name] = "grey: not told apart from the arms by colour"
        else:
            refs[name] = c
    return refs, na


def trajectory_target(truth: np.ndarray, meta: dict, frame: int, future: int) -> tuple[TrajectoryTarget | None, str]:
    """The target for predicting frame `future` (the `truth`, as evaluated) from frame `frame` of a
    simulated episode, or (None, why not). Frame `frame`'s states give how far things moved."""
    side = truth.shape[0]
    now, why = scene_state(meta, frame, side)
    then, why_then = scene_state(meta, future, side)
    if now is None or then is None:
        return None, why or why_then
    refs, na = _distinct_colours(then.colours)
    table = np.median(truth.reshape(-1, 3).astype(np.float64), axis=0)
    target = TrajectoryTarget(side, refs, table, {}, {}, {}, {})
    located = target.locate(truth)
    for name in then.colours:
        state = then.objects.get(name)
        d: dict = {"kind": "object", "state_px": None if state is None else [round(float(v), 2) for v in state]}
        target.detail[name] = d
        if name in na:
            d["na"] = na[name]
            continue
        xy, count = located[name]
        if state is None:
            d["na"] = "off-frame in the truth"
        elif xy is None or count < MIN_PIXELS:
            d["na"] = f"hidden in the truth ({count} px)"
        elif np.linalg.norm(xy - state) > max(3.0, STATE_TOLERANCE * side):
            d["na"] = f"its colour in the truth is {np.linalg.norm(xy - state):.1f} px from its state: not the object"
        else:
            target.truth_xy[name], target.truth_px[name] = xy, count
            d["truth_px"] = [round(float(v), 2) for v in xy]
            before = now.objects.get(name)
            d["moved_px"] = None if before is None else round(float(np.linalg.norm(state - before)), 2)
    half = max(2, round(side * PATCH_FRACTION))
    margin = max(3, round(side * MARGIN_FRACTION))
    padded = np.pad(truth, ((half, half), (half, half), (0, 0)), mode="edge")
    for arm, state in then.ee.items():
        before = now.ee.get(arm)
        if state is None:
            target.detail[arm] = {"kind": "hand", "na": "off-frame in the truth"}
            continue
        px = np.floor(state).astype(int)
        path = np.stack([px, np.floor(before).astype(int) if before is not None else px])
        lo = np.clip(path.min(axis=0) - margin, 0, side - 1)
        hi = np.clip(path.max(axis=0) + margin, 0, side - 1)
        template = padded[px[1] : px[1] + 2 * half + 1, px[0] : px[0] + 2 * half + 1]  # centred on px
        target.hands[arm] = (template, px, lo, hi)
        moved = None if before is None else round(float(np.linalg.norm(state - before)), 2)
        target.detail[arm] = {"kind": "hand", "state_px": [round(float(v), 2) for v in state], "moved_px": moved}
    return target, ""
