"""The resolution rule: the side a model runs at, for eval, export, infer, serve and bench alike.

The resolution it was trained at (lftk_model.json "resolution") unless the caller asks for another
(then a warning); a pipeline with no record runs at its VAE's native `sample_size`. The side must be
a multiple of the VAE's downsampling factor (4 for lftk's small presets, 8 for SD 1.5).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lftk.errors import LftkError

log = logging.getLogger(__name__)


def _side(size) -> int:
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def pick_resolution(pipeline_dir: Path, pipe, requested: int | None = None) -> int:
    """The trained resolution (lftk_model.json), unless asked otherwise; else the VAE's native size.
    `pipe`: the loaded pipeline, or None to read the VAE's config from `pipeline_dir`."""
    from lftk.model.base import read_meta

    trained = read_meta(pipeline_dir).get("resolution")
    if requested is not None:
        if trained and _side(trained) != int(requested):
            log.warning("running at %d px although the model was trained at %s px (lftk_model.json)", requested, trained)
        side = int(requested)
    elif trained:
        side = _side(trained)
    elif pipe is not None:
        side = _side(pipe.vae.config.sample_size)
    else:
        vae_config = Path(pipeline_dir) / "vae" / "config.json"
        try:
            side = _side(json.loads(vae_config.read_text())["sample_size"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LftkError(f"{vae_config}: no sample_size to take the resolution from ({exc}); give the resolution") from exc
    factor = getattr(pipe, "vae_scale_factor", None) if pipe is not None else None
    if factor and side % factor:
        raise LftkError(f"{pipeline_dir}: resolution {side} is not a multiple of the VAE's downsampling factor {factor}")
    return side
