"""Objects do not vanish: put back an object of the current frame that the prediction dropped
(sampling parameter `keep_objects`).

Over a 10 s horizon a robot moves objects; it rarely makes one disappear. A small latent diffusion
model hedges where it is unsure whether the arm will take a block or pass it by, and a hedged block
comes out faded into the table: the object is gone from the prediction altogether. This rule finds
the current frame's objects by colour (connected pixels of saturated colour, split by hue: blocks,
pads and tools are coloured, tables, floors and arms are dull or grey) and, for each one the
predicted frame no longer shows anywhere (fewer than FOUND_FRACTION of its pixel count within
COLOUR_DISTANCE of its colour), pastes that object's pixels from the current frame back where they
were. The test is strict on purpose: a block faded half into the table still has a few pixels near
its colour, and on 60 val pairs of the CPU demo a loose test (distance 64, a quarter of the pixels)
put back half as many of the dropped objects as this one. An object the model moved and drew is left alone; one it dropped stays where it was, which is
what copying the frame would have shown.

It is a prior, not a prediction: it cannot draw an object at its new place, and an object that
really leaves the view is put back. `lftk eval` scores the model with and without it (the tuned
value is in the model's lftk_model.json), so its worth is measured, not assumed.
"""

from __future__ import annotations

import math

import numpy as np

CHROMA_MIN = 64.0  # max - min channel, uint8: a simulated table is ~56, its blocks >= 100 (lftk.model.colour)
HUE_BINS = 12  # saturated neighbours of different hue (a red block on a blue pad) are different objects
MIN_PIXELS = 2  # a lone saturated pixel is noise or an edge, not an object
COLOUR_DISTANCE = 48.0  # uint8 RGB: a pixel this close to an object's mean colour shows that object
FOUND_FRACTION = 0.5  # the prediction shows an object if this share of its pixel count is there
GROW_PX = 1  # pasted with a 1 px rim: the object's blended edge comes back with it


def _hue_bins(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) float -> (H, W) int hue bin in [0, HUE_BINS)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hue = np.degrees(np.arctan2(math.sqrt(3) * (g - b), 2 * r - g - b)) % 360.0
    return np.minimum((hue / (360.0 / HUE_BINS)).astype(int), HUE_BINS - 1)


def object_masks(frame: np.ndarray) -> list[np.ndarray]:
    """(H, W, 3) uint8 -> one (H, W) bool mask per object: 8-connected saturated pixels of one hue bin,
    at least MIN_PIXELS of them."""
    from scipy.ndimage import label

    x = frame.astype(np.float32)
    saturated = (x.max(axis=-1) - x.min(axis=-1)) > CHROMA_MIN
    if not saturated.any():
        return []
    bins = _hue_bins(x)
    masks = []
    for h in np.unique(bins[saturated]):
        labels, n = label(saturated & (bins == h), structure=np.ones((3, 3), dtype=bool))
        for k in range(1, n + 1):
            m = labels == k
            if m.sum() >= MIN_PIXELS:
                masks.append(m)
    return masks


def restore_dropped(predicted: np.ndarray, current: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 each -> (B, H, W, 3) uint8: `predicted` with every object of `current` it
    does not show pasted back from `current` (see the module doc)."""
    from scipy.ndimage import binary_dilation

    if predicted.shape != current.shape:
        raise ValueError(f"frames of different shapes: {predicted.shape}, {current.shape}")
    out = predicted.copy()
    for b in range(len(predicted)):
        pred = predicted[b].astype(np.float32)
        for mask in object_masks(current[b]):
            colour = current[b][mask].astype(np.float32).mean(axis=0)
            shown = int((np.linalg.norm(pred - colour, axis=-1) < COLOUR_DISTANCE).sum())
            if shown >= math.ceil(FOUND_FRACTION * mask.sum()):
                continue
            grown = binary_dilation(mask, iterations=GROW_PX)
            out[b][grown] = current[b][grown]
    return out
