"""One sample's figures: whole-frame, motion-masked and trajectory metrics of a prediction.

`build_target` does once per sample what does not depend on the prediction (load the truth, the
motion mask, where the objects and hands truly are); `score_prediction` then scores any method's
frame against it, so the model and every baseline go through the same code.

`COLUMNS` is the one table of reported metrics (name, label, direction, group, format): the
summaries, the Markdown tables, the plots and `--compare` all read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from lftk.eval.metrics import METRICS, frame_metrics
from lftk.eval.motion import masked_metrics, motion_fraction, motion_mask
from lftk.eval.trajectory import TRAJECTORY_KEYS, TrajectoryTarget, episode_meta, trajectory_target


@dataclass(frozen=True)
class Column:
    name: str
    label: str
    higher_is_better: bool
    group: str  # "frame" | "motion" | "trajectory"
    fmt: str

    def show(self, value: float | None) -> str:
        return "n/a" if value is None else format(value, self.fmt)


COLUMNS: tuple[Column, ...] = (
    *(Column(m.name, m.label, m.higher_is_better, "frame", ".4f" if m.name == "ssim" else ".2f") for m in METRICS),
    Column("lpips", "LPIPS", False, "frame", ".4f"),  # None unless lpips and its weights are installed
    Column("motion_ssim", "SSIM in motion", True, "motion", ".4f"),
    Column("motion_psnr", "PSNR in motion (dB)", True, "motion", ".2f"),
    Column("motion_mse", "MSE in motion", False, "motion", ".1f"),
    Column("obj_err_px", "object error (px)", False, "trajectory", ".2f"),
    Column("obj_missing", "objects missing", False, "trajectory", ".2f"),
    Column("ee_err_px", "hand error (px)", False, "trajectory", ".2f"),
)
COLUMN = {c.name: c for c in COLUMNS}
GROUP_TITLES = {
    "frame": "Whole frame",
    "motion": "Where the scene moves (mask: current vs true future, dilated)",
    "trajectory": "Where things end up (pixels at the evaluated resolution)",
}


@dataclass(frozen=True)
class SampleTarget:
    current: np.ndarray  # (R, R, 3) uint8: what the model saw
    truth: np.ndarray  # (R, R, 3) uint8: what it should predict
    mask: np.ndarray  # (R, R) bool motion mask
    trajectory: TrajectoryTarget | None
    trajectory_na: str  # why there is no trajectory target ("" when there is one)


def build_target(
    current: np.ndarray, truth: np.ndarray, prompt: dict, frame: int | None, future: int | None
) -> SampleTarget:
    """Target for predicting source frame `future` from source frame `frame` of the pair's episode."""
    traj, why = None, ""
    if frame is None or future is None:
        why = "the pair does not name its frames (no frame/future_frame in prompt.json)"
    else:
        meta, why = episode_meta(prompt)
        if meta is not None:
            traj, why = trajectory_target(truth, meta, int(frame), int(future))
    return SampleTarget(current, truth, motion_mask(current, truth), traj, why)


def score_prediction(pred: np.ndarray, target: SampleTarget, lpips: Callable | None = None) -> tuple[dict, dict]:
    """({metric: value or None} for every column, plus the PSNR cap flags; {object or arm: error px})."""
    metrics = frame_metrics(pred, target.truth)
    metrics["lpips"] = None if lpips is None else lpips(pred, target.truth)
    metrics.update(masked_metrics(pred, target.truth, target.mask))
    if target.trajectory is None:
        metrics.update(dict.fromkeys(TRAJECTORY_KEYS))
        return metrics, {}
    traj, errors = target.trajectory.score(pred)
    metrics.update(traj)
    return metrics, errors


def row_base(target: SampleTarget) -> dict:
    """The parts of a report row that do not depend on any method."""
    row: dict = {"motion_frac": round(motion_fraction(target.mask), 5), "positions": {}, "na": {}}
    if target.trajectory is None:
        row["na"]["trajectory"] = target.trajectory_na
    else:
        row["positions"] = {name: dict(d, err_px={}) for name, d in target.trajectory.detail.items()}
    if not target.mask.any():
        row["na"]["motion"] = "nothing moves between the current and the true future frame"
    return row


def add_errors(row: dict, method: str, errors: dict) -> None:
    for name, err in errors.items():
        row["positions"][name]["err_px"][method] = None if err is None else round(err, 3)
