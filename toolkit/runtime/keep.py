"""Keep the camera's own pixels where the model predicts no change (sampling parameter `keep`).

A latent diffusion model redraws the whole frame through its VAE, and where it is unsure (will the
arm take this block or pass it by?) it hedges: small objects come out faded into the table. Where
the predicted frame differs little from the current frame *as the VAE redraws it* (decode of
encode), the model predicts no change, and the current frame's own pixels are the better estimate:
they carry no VAE loss and no hedge. Comparing with the redrawn frame, not the frame itself,
matters: an object the VAE itself blurs is blurred alike in both, so it counts as unchanged and is
kept as the camera saw it.

`keep` is the threshold on the difference (mean over RGB, 0-255, averaged over a 3x3 box): 0 is off
(the model's frame as it is); larger keeps more of the current frame, and at 255 the result is the
current frame. A trained model records the value chosen on its val split in lftk_model.json
(`lftk.train.tune`); eval, infer and serve apply it the same way.
"""

from __future__ import annotations

import numpy as np

SMOOTH_PX = 3  # box filter over the difference: one noisy pixel is not a change
GROW_PX = 3  # a changed pixel's neighbours count as changed too: the edges of what moved stay the model's


def keep_unchanged(predicted: np.ndarray, redrawn: np.ndarray, current: np.ndarray, threshold: float) -> np.ndarray:
    """(B, H, W, 3) uint8 each -> (B, H, W, 3) uint8: `current` where the prediction is within
    `threshold` of `redrawn` (and not next to a pixel that is not), `predicted` elsewhere."""
    from scipy.ndimage import maximum_filter, uniform_filter

    if threshold <= 0:
        return predicted
    if not predicted.shape == redrawn.shape == current.shape:
        raise ValueError(f"frames of different shapes: {predicted.shape}, {redrawn.shape}, {current.shape}")
    diff = np.abs(predicted.astype(np.float32) - redrawn.astype(np.float32)).mean(axis=-1)  # (B, H, W)
    changed = uniform_filter(diff, size=(1, SMOOTH_PX, SMOOTH_PX), mode="nearest") >= threshold
    changed = maximum_filter(changed, size=(1, GROW_PX, GROW_PX), mode="nearest")
    return np.where(changed[..., None], predicted, current)


def keep_current(predicted: np.ndarray, current: np.ndarray, redrawn: np.ndarray | None, keep: float,
                 keep_objects: bool) -> np.ndarray:
    """The sampling rules that take pixels from the current frame, in the one order eval, infer and
    serve apply them: `keep` (needs `redrawn`, the current frame through the VAE), then
    `keep_objects` (lftk.runtime.objects: objects the prediction dropped are put back)."""
    from lftk.runtime.objects import restore_dropped

    if keep > 0:
        if redrawn is None:
            raise ValueError("keep > 0 needs the current frame as the VAE redraws it")
        predicted = keep_unchanged(predicted, redrawn, current, keep)
    return restore_dropped(predicted, current) if keep_objects else predicted
