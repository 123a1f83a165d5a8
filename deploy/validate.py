"""What `POST /predict` accepts: its fields, their ranges, and a decompression-bomb-safe image decoder.

Everything a request can get wrong raises `InputError`, which carries the HTTP status, the field and
a sentence the server returns as `{"error": "FIELD: reason", "field": FIELD}`. Statuses:
  413  the body is over --max-upload-mb, or the image claims more than --max-pixels
  415  the body is not multipart/form-data, or the image is not PNG/JPEG/WebP/BMP
  422  a field is missing, unknown, repeated, not a number, out of range; the image is corrupt or truncated
  400  the multipart body itself is malformed (raised by the server, which owns the parser)

Pure functions over bytes and strings: testable without HTTP, and usable by another front end.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError

from lftk.data.images import to_square_rgb
from lftk.errors import LftkError

# Formats a camera frame comes in. Naming them stops Pillow from trying its other plug-ins on hostile
# bytes (EPS hands the file to Ghostscript, for one).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
MAX_SEED = 2**32 - 1
MAX_GUIDANCE = 50.0  # well past any useful scale; stops inf/1e30 from reaching the sampler

FILE_FIELDS = ("image",)
TEXT_FIELDS = ("instruction", "frames", "steps", "seed", "guidance", "image_guidance", "horizon")
MAX_HORIZON = 100_000  # frames ahead; what a model accepts is checked against its prompt template


class InputError(LftkError):
    """A request the server refuses: `status` is the HTTP code, `field` what was wrong."""

    def __init__(self, status: int, field: str, reason: str):
        self.status = status
        self.field = field
        super().__init__(f"{field}: {reason}")


@dataclass(frozen=True)
class Limits:
    """Per-request limits; each is a `lftk serve` option (the names in parentheses)."""

    max_upload_bytes: int = 10 * 2**20  # --max-upload-mb: a 4K PNG is ~10-25 MB, a camera JPEG ~1 MB
    max_pixels: int = 4096 * 4096  # --max-pixels: checked from the header, before any decoding
    max_prompt_chars: int = 500  # --max-prompt-chars: CLIP reads 77 tokens (~300 chars); the rest is cut
    max_frames: int = 16  # --max-frames: rollout length; cost grows linearly
    max_steps: int = 100  # --max-steps: denoising steps per frame

    def __post_init__(self):
        for name in ("max_upload_bytes", "max_pixels", "max_prompt_chars", "max_frames", "max_steps"):
            if getattr(self, name) < 1:
                raise LftkError(f"serve limit {name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Params:
    """A request's text fields, parsed and in range; defaults as `lftk infer`'s, except one frame.
    steps, guidance and image guidance left None are the model's own (the runner's `sampling`)."""

    instruction: str
    frames: int = 1
    steps: int | None = None
    seed: int = 0
    guidance: float | None = None
    image_guidance: float | None = None
    horizon: int | None = None  # frames ahead per step (a horizon-conditioned model); None: the model's
    keep: float | None = None  # not a request field: the model's own (lftk.runtime.keep), stated in the answer
    keep_objects: bool | None = None  # likewise (lftk.runtime.objects)
    scheduler: str | None = None  # likewise: the server's (`lftk serve --scheduler`, else the model's)


def parse_params(items: Iterable[tuple[str, str]], limits: Limits) -> Params:
    """(name, value) pairs of the non-file fields -> Params. The first problem raises InputError."""
    values: dict[str, str] = {}
    for name, value in items:
        if name not in TEXT_FIELDS:
            raise InputError(422, name, f"unknown field (fields: {', '.join(FILE_FIELDS + TEXT_FIELDS)})")
        if name in values:
            raise InputError(422, name, "given more than once")
        values[name] = value
    if "instruction" not in values:
        raise InputError(422, "instruction", "missing: say what the robot does, e.g. 'stack the blocks'")
    instruction = values["instruction"].strip()
    if not instruction:
        raise InputError(422, "instruction", "empty: say what the robot does, e.g. 'stack the blocks'")
    if len(instruction) > limits.max_prompt_chars:
        raise InputError(
            422, "instruction", f"{len(instruction)} characters, over the limit of {limits.max_prompt_chars} (--max-prompt-chars)"
        )
    defaults = Params(instruction)
    return Params(
        instruction=instruction,
        frames=_int(values, "frames", defaults.frames, 1, limits.max_frames, "--max-frames"),
        steps=_int(values, "steps", defaults.steps, 1, limits.max_steps, "--max-steps"),
        seed=_int(values, "seed", defaults.seed, 0, MAX_SEED, None),
        guidance=_float(values, "guidance", defaults.guidance),
        image_guidance=_float(values, "image_guidance", defaults.image_guidance),
        horizon=_int(values, "horizon", None, 1, MAX_HORIZON, None),
    )


def _int(values: dict[str, str], name: str, default: int | None, lo: int, hi: int, option: str | None) -> int | None:
    if name not in values:
        return default
    text = values[name].strip()
    try:
        value = int(text)
    except ValueError:
        raise InputError(422, name, f"{text[:40]!r} is not an integer") from None
    if not lo <= value <= hi:
        where = f" ({option})" if option else ""
        raise InputError(422, name, f"{value} is out of range {lo}..{hi}{where}")
    return value


def _float(values: dict[str, str], name: str, default: float) -> float:
    if name not in values:
        return default
    text = values[name].strip()
    try:
        value = float(text)
    except ValueError:
        raise InputError(422, name, f"{text[:40]!r} is not a number") from None
    if not (math.isfinite(value) and 0.0 <= value <= MAX_GUIDANCE):
        raise InputError(422, name, f"{value} is out of range 0..{MAX_GUIDANCE:g}")
    return value


def decode_image(data: bytes, resolution: int, max_pixels: int) -> np.ndarray:
    """Image file bytes -> (resolution, resolution, 3) uint8 RGB, centre-cropped and resized as
    `lftk infer` does it (lftk.data.images.to_square_rgb).

    `Image.open` reads only the header, so the pixel count is checked before a single pixel is
    decoded: a 50 kB PNG that claims 100k x 100k pixels costs nothing. Pillow's own bomb guard
    (`Image.MAX_IMAGE_PIXELS`, ~179 Mpx hard) stays on as a second line behind --max-pixels.
    """
    if not data:
        raise InputError(422, "image", "empty file")
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise InputError(413, "image", f"too many pixels ({exc})") from None
    except UnidentifiedImageError:
        raise InputError(415, "image", f"not a {', '.join(IMAGE_FORMATS)} image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(422, "image", f"unreadable image header ({exc})") from None
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise InputError(
                413, "image", f"{width}x{height} = {width * height} pixels, over the limit of {max_pixels} (--max-pixels)"
            )
        if width < 1 or height < 1:
            raise InputError(422, "image", f"{width}x{height}: no pixels")
        try:
            img.load()
            return np.asarray(to_square_rgb(img, resolution), dtype=np.uint8)
        except Image.DecompressionBombError as exc:
            raise InputError(413, "image", f"too many pixels ({exc})") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise InputError(422, "image", f"corrupt or truncated {img.format} image ({exc})") from None
