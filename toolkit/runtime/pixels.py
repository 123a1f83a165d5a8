"""Pixel normalisation, one rule for every stage: uint8 frames <-> the networks' [-1, 1] tensors.

Training (its data loader, the VAE fit) and sampling (infer, serve, eval, export's parity and
calibration) all convert here, with diffusers' own arithmetic (x / 255 * 2 - 1), so a frame means
the same numbers to the UNet at training time and at run time."""

from __future__ import annotations

import numpy as np
import torch


def images_to_model(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1]."""
    unit = torch.from_numpy(np.array(images, dtype=np.uint8)).to(torch.float32) / 255.0  # copy: inputs may be read-only
    return (2.0 * unit - 1.0).permute(0, 3, 1, 2).contiguous()


def image_to_model(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1]."""
    return images_to_model(image[None])[0]


def model_to_unit(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) float32 in [0, 1], clamped."""
    return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()


def unit_to_uint8(images: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] -> uint8, rounded as diffusers rounds to PIL (outside [0, 1]: clipped, not wrapped)."""
    return np.clip(np.round(np.asarray(images) * 255.0), 0, 255).astype(np.uint8)


def model_to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return unit_to_uint8(model_to_unit(images))
