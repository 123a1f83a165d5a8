"""Evaluation figures: grid.png (input | truth | prediction | abs-diff), rollout.gif (true frames
beside the model's self-fed rollout) and horizon.png (metrics against how far ahead)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from lftk.data.inspect import contact_sheet
from lftk.eval.rollout import RolloutResult
from lftk.eval.scoring import COLUMN

log = logging.getLogger(__name__)

GRID_PNG = "grid.png"
ROLLOUT_GIF = "rollout.gif"
HORIZON_PNG = "horizon.png"
DIFF_FULL_SCALE = 128  # uint8 levels shown as full brightness in the abs-diff column
HORIZON_METRICS = ("psnr", "motion_psnr", "obj_err_px")
GIF_FRAME_MS = 900


def _save(img: Image.Image, path: Path, **kw) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, **kw)
    os.replace(tmp, path)


def _cell_size(resolution: int) -> int:
    return int(min(max(resolution, 128), 256))  # big enough for captions, small enough to open anywhere


def abs_diff(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 heat image of the mean absolute difference over RGB (black: equal)."""
    import matplotlib

    d = np.abs(pred.astype(np.float64) - truth.astype(np.float64)).mean(axis=-1) / DIFF_FULL_SCALE
    rgba = matplotlib.colormaps["magma"](np.clip(d, 0.0, 1.0))  # (H, W, 4) in [0, 1]
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def _show(value: float | None, unit: str) -> str:
    return "n/a" if value is None else f"{value:.1f} {unit}"


def _objects(m: dict) -> str:
    if m["obj_missing"] == 1.0:
        return "none shown"
    return _show(m["obj_err_px"], "px")


def write_grid(out: Path, shown: Sequence[dict], resolution: int) -> Path:
    rows = [[s["input"], s["truth"], s["prediction"], abs_diff(s["prediction"], s["truth"])] for s in shown]
    labels = []
    for s in shown:
        m = s["metrics"]
        labels.append(
            f"{s['name']}  PSNR {m['psnr']:.1f} dB, in motion {_show(m['motion_psnr'], 'dB')},"
            f" objects {_objects(m)}"
        )
    heads = ["input", "truth", "prediction (model)", f"|pred - truth| (0-{DIFF_FULL_SCALE})"]
    sheet = contact_sheet(rows, heads, labels, cell=_cell_size(resolution))
    path = out / GRID_PNG
    _save(sheet, path, format="PNG")
    return path


def write_rollout_gif(out: Path, rollout: RolloutResult, horizon: int | None, resolution: int) -> Path:
    """One GIF frame per step: the true frame beside the model's self-fed prediction."""
    frames = []
    for k, (truth, pred) in enumerate(rollout.strip):
        # PIL's default font has no Δ: frames ahead, and the step, in plain digits.
        if k == 0:
            when = "t"
        else:
            when = f"t+{k * horizon} (step {k})" if horizon else f"step {k}"
        sheet = contact_sheet([[truth, pred]], ["truth", "model (self-fed)"], [f"{when}: {rollout.strip_name}"],
                              cell=_cell_size(resolution))
        frames.append(sheet.convert("P", palette=Image.ADAPTIVE))
    path = out / ROLLOUT_GIF
    _save(frames[0], path, format="GIF", save_all=True, append_images=frames[1:], duration=GIF_FRAME_MS, loop=0)
    return path


def _series(sections: dict, method: str, metric: str, x_of) -> tuple[list, list, list]:
    xs, ys, errs = [], [], []
    for key, sec in sections.items():
        stat = sec["summary"].get(method, {}).get(metric)
        x = x_of(key, sec)
        if stat is None or stat["mean"] is None or x is None:
            continue
        xs.append(x)
        ys.append(stat["mean"])
        lo, hi = stat["ci"] or (stat["mean"], stat["mean"])
        errs.append((stat["mean"] - lo, hi - stat["mean"]))
    return xs, ys, errs


def write_horizon_plot(out: Path, report: dict) -> Path | None:
    """Metric against horizon (frames ahead): the pairs' horizons for every method, and the
    rollout's steps (dashed: model fed its own outputs, and copy, on the rollout's samples)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def horizon_key(key, _sec):
        return int(key) if key.lstrip("-").isdigit() else None

    colour = {m: f"C{i}" for i, m in enumerate(report["methods"])}
    fig, axes = plt.subplots(1, len(HORIZON_METRICS), figsize=(4.2 * len(HORIZON_METRICS), 3.4), dpi=100)
    drawn = False
    for ax, metric in zip(axes, HORIZON_METRICS):
        col = COLUMN[metric]
        for method in report["methods"]:
            xs, ys, errs = _series(report["per_horizon"], method, metric, horizon_key)
            if xs:
                ax.errorbar(xs, ys, yerr=np.array(errs).T, fmt="o", capsize=3, color=colour[method], label=method)
                drawn = True
        ro = report.get("rollout")
        for method in ro["methods"] if ro else ():
            xs, ys, errs = _series(ro["per_step"], method, metric, lambda _k, sec: sec["horizon"])
            if xs:
                label = f"{method}, rollout samples" + (" (self-fed)" if method == "model" else "")
                ax.errorbar(xs, ys, yerr=np.array(errs).T, fmt="--", capsize=3, color=colour[method], alpha=0.7,
                            label=label)
                drawn = True
        ax.set_title(f"{col.label} {'↑' if col.higher_is_better else '↓'}")
        ax.set_xlabel("horizon (frames ahead)")
        ax.grid(alpha=0.3)
    if not drawn:
        plt.close(fig)
        return None
    axes[0].legend(fontsize=8)
    fig.suptitle("mean and 95% bootstrap interval over episodes", fontsize=9)
    fig.tight_layout()
    path = out / HORIZON_PNG
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_figures(out: Path, report: dict, shown: Sequence[dict], rollout: RolloutResult | None) -> list[str]:
    """Every figure the report has data for; returns their file names."""
    out.mkdir(parents=True, exist_ok=True)
    res = report["settings"]["resolution"]
    paths = [write_grid(out, shown, res)] if shown else []
    if rollout is not None and len(rollout.strip) > 1:
        horizon = rollout.rows[0]["horizon"] if rollout.rows else None
        paths.append(write_rollout_gif(out, rollout, horizon, res))
    plot = write_horizon_plot(out, report)
    if plot is not None:
        paths.append(plot)
    return [p.name for p in paths]
