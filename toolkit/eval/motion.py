"""Motion-aware metrics: PSNR, SSIM and MSE only where the scene changes.

Over 10 s most of a head-camera frame is static table, so whole-frame figures reward a model
that copies its input and draws the arm in the wrong place. The motion mask is where the current
frame and the true future frame differ; it depends on neither the prediction nor the method, so
every method is scored on the same pixels.

Mask rule (fixed so figures compare across runs):
- per pixel, the largest absolute difference over the RGB channels between the current and the
  true future frame (uint8 levels, or float levels times 255);
- above MOTION_THRESHOLD levels: JPEG at quality 95 and the bicubic resize move a static pixel by
  a few levels, a moved arm or block by tens;
- dilated by `dilation_radius(resolution)` px (a square, 1/32 of the side) so the region also
  holds the edges around a moved part, where a wrong prediction shows first.

Within the mask: MSE and PSNR over the masked pixels (all channels); SSIM as the mean of the local
SSIM map (metrics.ssim_map, same window and constants) over masked pixels away from the 5 px
border. A sample with no motion, or with motion only on the border for SSIM, gets None: n/a, not
a perfect score.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_dilation

from lftk.eval.metrics import SSIM_RADIUS, data_range, psnr_from_mse, ssim_map

MOTION_THRESHOLD = 24  # uint8 levels, max over channels (~9% of the range)
DILATION_FRACTION = 1 / 32  # of the frame side: 2 px at 64, 4 px at 128

MOTION_KEYS = ("motion_ssim", "motion_psnr", "motion_mse")


def dilation_radius(side: int) -> int:
    return max(1, round(side * DILATION_FRACTION))


def motion_mask(current: np.ndarray, truth: np.ndarray, threshold: float = MOTION_THRESHOLD) -> np.ndarray:
    """(H, W) bool: where the true future differs from the current frame, dilated."""
    scale = 1.0 if data_range(current, truth) == 255.0 else 255.0  # threshold is in uint8 levels
    diff = np.abs(current.astype(np.float64) - truth.astype(np.float64)) * scale
    changed = (diff.max(axis=-1) if diff.ndim == 3 else diff) > threshold  # (H, W)
    r = dilation_radius(min(changed.shape))
    return binary_dilation(changed, structure=np.ones((2 * r + 1, 2 * r + 1), bool))


def masked_metrics(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict:
    """{"motion_ssim", "motion_psnr", "motion_mse", "motion_psnr_capped"}; None where the mask is empty."""
    peak = data_range(pred, truth)
    if mask.shape != pred.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match frames {pred.shape[:2]}")
    out: dict = dict.fromkeys(MOTION_KEYS)
    out["motion_psnr_capped"] = False
    if not mask.any():
        return out
    diff = pred.astype(np.float64)[mask] - truth.astype(np.float64)[mask]  # (n, C)
    err = float(np.mean(diff * diff))
    out["motion_mse"] = err
    out["motion_psnr"], out["motion_psnr_capped"] = psnr_from_mse(err, peak)
    inner = mask[SSIM_RADIUS:-SSIM_RADIUS, SSIM_RADIUS:-SSIM_RADIUS]  # ssim_map's extent
    if inner.any():
        s_map = ssim_map(pred, truth)
        out["motion_ssim"] = float(s_map[inner].mean())  # (n, C) -> one mean: equal count per channel
    return out


def motion_fraction(mask: np.ndarray) -> float:
    """Share of the frame inside the mask: how much of the scene changed (reported per sample)."""
    return float(mask.mean())
