"""The self-fed rollout baseline: the model predicts t+Δ, is fed its own t+Δ to predict t+2Δ, ...

Deployment runs rollouts (lftk infer --mode rollout), and errors compound: a model that is good
one step ahead can drift two steps ahead. Each step k is scored against the true frame t+kΔ of
the pair's source episode, beside the copy baseline for the same step (the current frame t held
for kΔ). Step 1 uses the same noise seed as the main evaluation, so its figures are the model's
on those samples.

Cheap by design: a few samples spread over the split (those whose episode runs long enough),
`steps` predictions each.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from lftk.data.episodes import Episode, read_episode
from lftk.data.images import load_rgb
from lftk.data.inspect import spread_indices
from lftk.data.pairset import Pair
from lftk.eval.methods import MODEL_METHOD, EvalSettings, Predictor, make_items, sample_seed
from lftk.eval.scoring import add_errors, build_target, row_base, score_prediction

log = logging.getLogger(__name__)

ROLLOUT_SAMPLES = 8
ROLLOUT_METHODS = (MODEL_METHOD, "copy")  # model: fed its own outputs after step 1


@lru_cache(maxsize=64)
def _episode(path: str) -> Episode | None:
    try:
        return read_episode(Path(path))
    except (ValueError, OSError):
        return None


def _horizon(pair: Pair) -> int | None:
    p = pair.prompt
    if isinstance(p.get("horizon"), int):
        return p["horizon"]
    if isinstance(p.get("frame"), int) and isinstance(p.get("future_frame"), int):
        return p["future_frame"] - p["frame"]
    return None


def rollout_frames(pair: Pair, steps: int) -> list[Path] | None:
    """Paths of the true frames t+Δ .. t+steps·Δ, or None when the source episode does not reach."""
    src, frame, horizon = pair.prompt.get("source_episode_dir"), pair.prompt.get("frame"), _horizon(pair)
    if not src or not isinstance(frame, int) or not horizon:
        return None
    ep = _episode(str(src))
    last = frame + steps * horizon
    if ep is None or last >= ep.n_frames:
        return None
    return [ep.frame_paths[frame + k * horizon] for k in range(1, steps + 1)]


@dataclass
class RolloutResult:
    rows: list[dict]  # one per (sample, step)
    strip: list[tuple[np.ndarray, np.ndarray]]  # first sample: (truth, prediction) for t, t+Δ, ...
    strip_name: str
    eligible: int


def run_rollout(
    pairs: Sequence[Pair], model: Predictor, settings: EvalSettings, steps: int, n_samples: int = ROLLOUT_SAMPLES,
    first_step: dict[str, np.ndarray] | None = None,
) -> tuple[RolloutResult | None, str]:
    """(result, "") or (None, why no rollout could be scored). `first_step`: the model's predictions
    already made for these samples (same seed), by sample name: step 1 reuses them."""
    eligible = [(p, f) for p in pairs if (f := rollout_frames(p, steps)) is not None]
    if not eligible:
        return None, f"no pair's source episode runs {steps} horizons past its current frame"
    chosen = [eligible[i] for i in spread_indices(len(eligible), n_samples)]
    log.info("rollout: %d samples x %d steps (%d eligible)", len(chosen), steps, len(eligible))
    result = RolloutResult([], [], chosen[0][0].name, len(eligible))
    for start in range(0, len(chosen), settings.batch_size):
        batch = chosen[start : start + settings.batch_size]
        _run_batch(batch, model, settings, result, first=start == 0, known=first_step or {})
    return result, ""


def _run_batch(
    batch, model: Predictor, settings: EvalSettings, result: RolloutResult, first: bool, known: dict
) -> None:
    res = settings.resolution
    items = make_items([p for p, _ in batch], settings)
    currents = [it.current for it in items]
    if first:
        result.strip.append((currents[0], currents[0]))
    preds: list = []  # step k's input is step k-1's output
    for k in range(1, len(batch[0][1]) + 1):
        if k > 1:  # the model's own previous output is its input now; fresh noise per step
            items = [
                replace(it, current=pred, seed=sample_seed(settings.seed, f"{it.pair.name}@{k}"))
                for it, pred in zip(items, preds)
            ]
        if k == 1 and all(it.pair.name in known for it in items):
            preds = [known[it.pair.name] for it in items]
        else:
            preds = model(items)
        for j, ((pair, frames), pred) in enumerate(zip(batch, preds)):
            frame = pair.prompt["frame"]
            future = frame + k * _horizon(pair)
            target = build_target(currents[j], load_rgb(frames[k - 1], res), pair.prompt, frame, future)
            row = {
                "sample": pair.name, "task": pair.task, "episode": pair.prompt.get("episode"),
                "frame": frame, "step": k, "horizon": future - frame, **row_base(target), "metrics": {},
            }
            for method, frame_pred in ((MODEL_METHOD, pred), ("copy", currents[j])):
                row["metrics"][method], errors = score_prediction(frame_pred, target)
                add_errors(row, method, errors)
            result.rows.append(row)
            if first and j == 0:
                result.strip.append((target.truth, pred))
