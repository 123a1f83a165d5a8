"""Reading and writing frames. One resize policy everywhere: centre-crop to a square, then resize
(bicubic on the way down), so a frame is never stretched."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lftk.errors import LftkError

JPEG_QUALITY = 95


def to_square_rgb(img: Image.Image, resolution: int | None) -> Image.Image:
    """RGBA/greyscale/palette -> RGB, centre-crop to square, resize to `resolution`."""
    if img.mode != "RGB":
        if img.mode in ("RGBA", "LA", "P"):
            img = img.convert("RGBA")
            bg = Image.new("RGB", img.size, (0, 0, 0))
            bg.paste(img, mask=img.split()[-1])
            img = bg
        else:
            img = img.convert("RGB")
    if resolution is None:
        return img
    w, h = img.size
    side = min(w, h)
    if w != h:
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if side != resolution:
        img = img.resize((resolution, resolution), Image.BICUBIC)
    return img


def open_image(path: Path | str) -> Image.Image:
    """Open and fully decode an image; a corrupt or truncated file raises LftkError naming it."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise LftkError(f"{path}: image not found") from None
    except Image.DecompressionBombError as exc:
        raise LftkError(f"{path}: refused: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise LftkError(f"{path}: not a readable image ({exc})") from None


def decode_image_bytes(data: bytes, name: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.copy()
    except Image.DecompressionBombError as exc:
        raise LftkError(f"{name}: refused: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise LftkError(f"{name}: not a readable image ({exc})") from None


def load_rgb(path: Path | str, resolution: int | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB array, square at `resolution` when given."""
    return np.asarray(to_square_rgb(open_image(path), resolution), dtype=np.uint8)


def save_rgb(arr: np.ndarray, path: Path | str) -> None:
    """Write a (H, W, 3) uint8 array; JPEG with fixed settings so the bytes are reproducible."""
    path = Path(path)
    img = Image.fromarray(np.asarray(arr, dtype=np.uint8), "RGB")
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, quality=JPEG_QUALITY, subsampling=0, optimize=False)
    else:
        img.save(path)
