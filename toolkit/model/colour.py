"""Where a robot frame's objects are: pixels of saturated colour.

Blocks, target pads and tools are small and coloured; table, floor and arms are dull or grey. A plain
reconstruction or noise-prediction loss is lowest when a 4 px block is blurred into the table (0.4%
of a 64 px frame), so the VAE fit (lftk.model.vae_fit) and, optionally, the diffusion loss
(train.loss.colour_weight) weigh these pixels more.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHROMA_THRESHOLD = 0.25  # max - min channel, on a 0..1 scale: the simulator's table is ~0.22, its blocks >= 0.4


def chroma_mask(pixels: torch.Tensor, threshold: float = CHROMA_THRESHOLD) -> torch.Tensor:
    """(B, 3, H, W) pixels in [-1, 1] -> (B, 1, H, W) float, 1 where the chroma exceeds `threshold`."""
    chroma = (pixels.amax(dim=1, keepdim=True) - pixels.amin(dim=1, keepdim=True)) / 2
    return (chroma > threshold).float()


def normalised_weights(mask: torch.Tensor, weight: float) -> torch.Tensor:
    """1 + weight where `mask`, scaled to mean 1 over the batch (the loss keeps its scale)."""
    w = 1.0 + weight * mask
    return w / w.mean()


def latent_mask(pixels: torch.Tensor, factor: int, threshold: float = CHROMA_THRESHOLD) -> torch.Tensor:
    """(B, 1, H/factor, W/factor): latent cells whose pixels hold any saturated colour."""
    return F.max_pool2d(chroma_mask(pixels, threshold), kernel_size=factor)
