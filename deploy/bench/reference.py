"""Each row's frames against torch fp32's for the same inputs and seed, and the bar each precision must clear.

fp32 graphs must match torch as export parity does; fp16 as the engine check does; int8 as the int8
export gate does (30 dB, or 3 dB closer than a change of seed)."""

from __future__ import annotations

import numpy as np

from lftk.eval.metrics import psnr_db
from lftk.export.parity import FRAME_PSNR_MIN_DB
from lftk.runtime.runner import Runner

from lftk.deploy.bench.timing import INSTRUCTION

PARITY_MIN_DB = {"fp32": FRAME_PSNR_MIN_DB, "fp16": 30.0}
INT8_GOOD_DB, INT8_MARGIN_DB = 30.0, 3.0


def to_unit(frames: np.ndarray) -> np.ndarray:
    return np.asarray(frames, np.float64) / 255.0


def min_db(precision: str, seed_baseline: float | None) -> float:
    if precision == "int8":
        return INT8_GOOD_DB if seed_baseline is None else min(INT8_GOOD_DB, seed_baseline + INT8_MARGIN_DB)
    return PARITY_MIN_DB.get(precision, FRAME_PSNR_MIN_DB)


def reference(runner: Runner, starts, steps, seed, want_baseline: bool, frames: np.ndarray | None = None):
    """torch fp32's batched frames, and (for int8 rows) the PSNR between two torch seeds: the scale
    int8's distance from fp32 is judged on, as the export's int8 gate does."""
    if frames is None:
        frames = runner.predict(starts, INSTRUCTION, steps, seed=seed)
    baseline = None
    if want_baseline:
        other = runner.predict(starts, INSTRUCTION, steps, seed=seed + 1)
        baseline = psnr_db(to_unit(frames), to_unit(other))
    return frames, baseline


def judge(row: dict, reference_frames: np.ndarray, frames: np.ndarray, seed_baseline: float | None) -> None:
    """Write the row's PSNR against the reference and its bar; a row under the bar fails."""
    value = round(psnr_db(to_unit(reference_frames), to_unit(frames)), 3)
    minimum = round(min_db(row["precision"], seed_baseline), 3)
    row.update(parity_psnr_db=value, parity_min_db=minimum)
    if value < minimum:
        row["status"] = f"parity failed ({value:.1f} < {minimum:.1f} dB)"
