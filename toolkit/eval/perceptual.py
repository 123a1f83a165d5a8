"""LPIPS (Zhang et al. 2018, AlexNet variant), only when this machine already has everything.

LPIPS needs the `lpips` package, torchvision and AlexNet's ImageNet weights. lftk installs none
of them and evaluation never downloads, so LPIPS is computed only when all three are present
(the weights in torch's hub cache, where torchvision looks); otherwise the report lists it as
unavailable with the reason, and every other figure is unaffected.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"  # torchvision's file name for AlexNet's ImageNet weights


def lpips_status() -> tuple[bool, str]:
    """(True, "") when LPIPS can run offline here, else (False, what is missing)."""
    if importlib.util.find_spec("lpips") is None:
        return False, ("the lpips package is not installed (lftk does not install it; "
                       "it also needs torchvision and AlexNet's weights)")
    if importlib.util.find_spec("torchvision") is None:
        return False, "lpips is installed but torchvision, which it needs, is not"
    import torch

    weights = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS
    if not weights.is_file():
        return False, f"AlexNet weights not found at {weights}; LPIPS would download them, evaluation never downloads"
    return True, ""


class Lpips:
    """LPIPS distance of two (H, W, 3) uint8 frames; lower is closer."""

    def __init__(self) -> None:
        import lpips
        import torch

        self.torch = torch
        self.net = lpips.LPIPS(net="alex", verbose=False).eval()

    def __call__(self, pred: np.ndarray, truth: np.ndarray) -> float:
        def tensor(a: np.ndarray):
            t = self.torch.from_numpy(np.ascontiguousarray(a)).float().permute(2, 0, 1)[None]  # (1, 3, H, W)
            return t / 127.5 - 1.0  # LPIPS expects [-1, 1]

        with self.torch.no_grad():
            return float(self.net(tensor(pred), tensor(truth)).item())


def load_lpips() -> tuple[Lpips | None, str]:
    ok, why = lpips_status()
    return (Lpips(), "") if ok else (None, why)
