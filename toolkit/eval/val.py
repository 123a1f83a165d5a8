"""The evaluation metrics during training: a fixed small val subset every N steps.

The training loop calls `val_metrics(pipe, pairs, ...)` with its pipeline (whose UNet is the one
being trained) and logs the flat dict it returns to metrics.jsonl (and TensorBoard when that
package is installed: lftk does not depend on it). The subset is the same at every call (spread
over the split, so every task is in it) and so is the noise (per-sample seeds), so the curve
moves only because the model does. Figures are the same code as `lftk eval`: whole-frame,
motion-masked and trajectory metrics, model and copy baseline.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from lftk.data.inspect import spread_indices
from lftk.data.pairset import Pair
from lftk.eval.methods import EvalSettings, PipelinePredictor, copy_predictor
from lftk.runtime.params import SamplingParams

log = logging.getLogger(__name__)

VAL_KEYS = ("ssim", "psnr", "mse", "motion_ssim", "motion_psnr", "obj_err_px", "obj_missing", "ee_err_px")
VAL_PREFIX = "val_"


def val_metrics(
    pipe,
    pairs: Sequence[Pair],
    resolution: int,
    prompt_template: str = "{instruction}",
    max_samples: int = 8,
    steps: int = 10,
    guidance: float = SamplingParams.guidance,
    image_guidance: float = SamplingParams.image_guidance,
    seed: int = 0,
    batch_size: int = 4,
    with_copy: bool = False,
    keep: float = SamplingParams.keep,
    keep_objects: bool = SamplingParams.keep_objects,
) -> dict[str, float]:
    """{"val_ssim": mean, "val_psnr": ..., "val_motion_psnr": ..., "val_obj_err_px": ..., "val_n": n}
    over a fixed subset of `pairs`; metrics that are n/a on every sample are left out. With
    `with_copy`, the copy baseline's figures too ("val_copy_psnr", ...): constant over training,
    the line the model must cross.

    The UNet is put in eval mode for the call and given back in the mode it was in.
    """
    return val_metrics_by_keep(pipe, pairs, resolution, prompt_template, max_samples, steps, guidance, image_guidance,
                               seed, batch_size, with_copy, keeps=((keep, keep_objects),))[0]


def val_metrics_by_keep(
    pipe,
    pairs: Sequence[Pair],
    resolution: int,
    prompt_template: str,
    max_samples: int,
    steps: int,
    guidance: float,
    image_guidance: float,
    seed: int,
    batch_size: int = 4,
    with_copy: bool = False,
    keeps: Sequence[tuple[float, bool]] = ((SamplingParams.keep, SamplingParams.keep_objects),),
) -> list[dict[str, float]]:
    """`val_metrics`' figures for each (`keep`, `keep_objects`), in order, from one sampling of the
    subset (both only choose, per pixel, between the model's frame and the current one)."""
    import torch

    from lftk.eval.evaluate import _Memo, score
    from lftk.eval.methods import redraw
    from lftk.runtime.keep import keep_current

    if not len(pairs):
        return [{} for _ in keeps]
    picks = [pairs[i] for i in spread_indices(len(pairs), max_samples)]
    device = str(getattr(pipe, "device", "cpu"))
    settings = EvalSettings(resolution, prompt_template, steps, guidance, image_guidance, seed, batch_size, device)
    raw = _Memo(PipelinePredictor(pipe, settings))
    redrawn = _Memo(lambda items: list(redraw(pipe, np.stack([it.current for it in items]))))

    def kept(threshold: float, objects: bool):
        def predict(items):
            current = np.stack([it.current for it in items])
            again = np.stack(redrawn(items)) if threshold > 0 else None
            return list(keep_current(np.stack(raw(items)), current, again, threshold, objects))

        return predict if threshold > 0 or objects else raw

    names = [f"keep{i}" for i in range(len(keeps))]
    methods = {name: kept(k, o) for name, (k, o) in zip(names, keeps)}
    if with_copy:
        methods["copy"] = copy_predictor
    unet = pipe.unet
    was_training = unet.training
    unet.eval()
    try:
        with torch.autocast(device_type="cuda", enabled=device.startswith("cuda")):
            rows, _ = score(picks, methods, settings, quiet=True)
    finally:
        unet.train(was_training)
    copy = _figures(rows, "copy", VAL_PREFIX + "copy_") if with_copy else {}
    return [{**_figures(rows, name, VAL_PREFIX), **copy, VAL_PREFIX + "n": len(rows)} for name in names]


def _figures(rows: list[dict], method: str, prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in VAL_KEYS:
        values = [r["metrics"][method][key] for r in rows if r["metrics"][method][key] is not None]
        if values:
            out[prefix + key] = round(float(np.mean(values)), 6)
    return out


class TensorBoardLog:
    """Scalars to TensorBoard under RUN/tensorboard when the `tensorboard` package is installed;
    otherwise a no-op that says so once (metrics.jsonl has every figure either way)."""

    def __init__(self, run_root: Path | str):
        self.writer = None
        if importlib.util.find_spec("tensorboard") is None:
            log.info("tensorboard is not installed: metrics go to metrics.jsonl only")
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_root) / "tensorboard"))

    def log(self, step: int, scalars: dict) -> None:
        if self.writer is None:
            return
        for key, value in scalars.items():
            if isinstance(value, (int, float)) and key not in ("step", "time"):
                tag = "val/" + key[len(VAL_PREFIX):] if key.startswith(VAL_PREFIX) else key
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_val_metrics(rows: Sequence[dict], out: Path | str) -> Path | None:
    """val_metrics.png from metrics.jsonl rows: the model's val figures against step, with the
    copy baseline as a dashed line when it was logged. None when no row holds val figures."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lftk.eval.scoring import COLUMN

    panels = [k for k in ("psnr", "motion_psnr", "obj_err_px") if any(VAL_PREFIX + k in r for r in rows)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), dpi=100, squeeze=False)
    for ax, key in zip(axes[0], panels):
        pts = [(r["step"], r[VAL_PREFIX + key]) for r in rows if VAL_PREFIX + key in r]
        ax.plot(*zip(*pts), "o-", lw=1.2, label="model")
        copy = [(r["step"], r[f"{VAL_PREFIX}copy_{key}"]) for r in rows if f"{VAL_PREFIX}copy_{key}" in r]
        if copy:
            ax.plot(*zip(*copy), "--", lw=1, label="copy")
        col = COLUMN[key]
        ax.set_title(f"val {col.label} {'↑' if col.higher_is_better else '↓'}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out
