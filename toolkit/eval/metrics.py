"""Frame metrics: SSIM, PSNR, MSE between a predicted and a true frame.

Conventions, fixed so that figures are comparable across runs and papers:
- Inputs are both uint8 (data range 255) or both float in [0, 1] (data range 1.0); mixing the
  two is refused, because a uint8/float mix silently changes PSNR by 48 dB.
- SSIM is Wang et al. (2004) as scikit-image computes it with
  `structural_similarity(a, b, channel_axis=-1, data_range=..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False)`: Gaussian window sigma 1.5 truncated at 3.5 sigma (11 px),
  population covariance, borders of 5 px left out (so padding never counts), mean over channels.
- PSNR of identical frames is infinite; the public figure is capped at PSNR_CAP_DB and flagged,
  so a report stays valid JSON and a mean over samples stays finite.

`METRICS` is the one table the evaluator and the report read: a new metric is one row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.ndimage import gaussian_filter

PSNR_CAP_DB = 100.0
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # scikit-image's choice: radius int(3.5 * 1.5 + 0.5) = 5, an 11 px window
SSIM_K1, SSIM_K2 = 0.01, 0.03  # Wang et al. 2004, eq. 13
SSIM_RADIUS = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)


def data_range(a: np.ndarray, b: np.ndarray) -> float:
    """255 for two uint8 frames, 1.0 for two float frames in [0, 1]; anything else is a caller bug."""
    if a.shape != b.shape:
        raise ValueError(f"frames differ in shape: {a.shape} vs {b.shape}")
    if a.dtype == np.uint8 and b.dtype == np.uint8:
        return 255.0
    if np.issubdtype(a.dtype, np.floating) and np.issubdtype(b.dtype, np.floating):
        lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"float frames must lie in [0, 1], got [{lo:g}, {hi:g}]")
        return 1.0
    raise TypeError(f"frames must both be uint8 or both float in [0, 1], got {a.dtype} and {b.dtype}")


def mse(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean squared error in the frames' own units (uint8 levels squared, or [0, 1] squared)."""
    data_range(pred, truth)
    diff = pred.astype(np.float64) - truth.astype(np.float64)
    return float(np.mean(diff * diff))


def psnr_raw(pred: np.ndarray, truth: np.ndarray) -> float:
    """PSNR in dB; inf for identical frames."""
    r = data_range(pred, truth)
    err = mse(pred, truth)
    return math.inf if err == 0.0 else 10.0 * math.log10(r * r / err)


def psnr(pred: np.ndarray, truth: np.ndarray) -> tuple[float, bool]:
    """(PSNR in dB capped at PSNR_CAP_DB, whether it was capped)."""
    return psnr_from_mse(mse(pred, truth), data_range(pred, truth))


def ssim_map(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Local SSIM, (H - 2r, W - 2r, C) with r = SSIM_RADIUS: the border rows and columns, whose
    window overhangs the frame and so reads padding, are left out (as scikit-image does)."""
    r = data_range(pred, truth)
    if pred.ndim not in (2, 3):
        raise ValueError(f"expected (H, W) or (H, W, C) frames, got shape {pred.shape}")
    win = 2 * SSIM_RADIUS + 1
    if min(pred.shape[:2]) < win:
        raise ValueError(f"SSIM needs frames of at least {win}x{win} px, got {pred.shape[:2]}")
    x = pred.astype(np.float64)
    y = truth.astype(np.float64)
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]  # (H, W, 1): one code path for grey and colour
    # sigma 0 on the channel axis: scipy skips it, so each channel is blurred on its own.
    sigma = (SSIM_SIGMA, SSIM_SIGMA, 0.0)

    def blur(a: np.ndarray) -> np.ndarray:
        return gaussian_filter(a, sigma=sigma, truncate=SSIM_TRUNCATE, mode="reflect")

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * r) ** 2, (SSIM_K2 * r) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    s_map = num / den
    return s_map[SSIM_RADIUS:-SSIM_RADIUS, SSIM_RADIUS:-SSIM_RADIUS]


def ssim(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean SSIM of (H, W) or (H, W, C) frames; see the module docstring for the exact definition."""
    inner = ssim_map(pred, truth)
    per_channel = inner.reshape(-1, inner.shape[-1]).mean(axis=0, dtype=np.float64)
    return float(per_channel.mean())


def psnr_from_mse(err: float, peak: float) -> tuple[float, bool]:
    """(PSNR in dB capped at PSNR_CAP_DB, whether it was capped) for a mean squared error."""
    value = math.inf if err == 0.0 else 10.0 * math.log10(peak * peak / err)
    return (PSNR_CAP_DB, True) if value >= PSNR_CAP_DB else (value, False)


@dataclass(frozen=True)
class Metric:
    name: str
    label: str  # for tables: name and unit
    higher_is_better: bool
    fn: Callable[[np.ndarray, np.ndarray], float]


def psnr_db(pred: np.ndarray, truth: np.ndarray) -> float:
    """PSNR in dB capped at PSNR_CAP_DB: the figure of eval, export parity, bench and infer alike."""
    return psnr(pred, truth)[0]


METRICS: tuple[Metric, ...] = (
    Metric("ssim", "SSIM", True, ssim),
    Metric("psnr", "PSNR (dB)", True, psnr_db),
    Metric("mse", "MSE", False, mse),
)


def frame_metrics(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Every metric in METRICS for one frame pair, plus `psnr_capped` (True when PSNR hit the cap)."""
    row = {m.name: m.fn(pred, truth) for m in METRICS}
    row["psnr_capped"] = row["psnr"] >= PSNR_CAP_DB  # psnr() returns exactly the cap when it caps
    return row
