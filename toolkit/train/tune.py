"""Choose the sampling defaults a trained model records, by measurement on its val split.

Guidance scales matter as much as training for a small model: on the CPU demo, text/image guidance
7.5/1.5 (InstructPix2Pix's defaults, tuned for photographs) scored below 3.0/3.0 on every metric.
The recipe's `sampling` section lists candidate scales; after training, each (text, image) pair is
scored with `lftk eval`'s code on a fixed subset of the val split (never the test split), and the
best one goes into final/lftk_model.json, which eval, infer and serve read.

Best = lowest mean rank over the four headline metrics (PSNR, PSNR where the scene moves, hand
error, objects missing), ties to the higher PSNR in motion: no single figure can buy the choice.
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Sequence

from lftk.runtime.params import SamplingParams

log = logging.getLogger(__name__)

RANKED = (("psnr", True), ("motion_psnr", True), ("ee_err_px", False), ("obj_missing", False))
TUNE_FILE = "sampling_tune.json"  # in the run dir: every candidate's figures


def candidates(guidance: Sequence[float], image_guidance: Sequence[float]) -> list[tuple[float, float]]:
    return list(itertools.product(guidance, image_guidance))


def pick(results: list[dict]) -> dict:
    """The best of `results` (dicts with "val_<metric>" figures), by mean rank over RANKED."""
    ranks = [0.0] * len(results)
    for key, higher in RANKED:
        values = [r.get("val_" + key) for r in results]
        if all(v is None for v in values):
            continue
        order = sorted(range(len(results)), key=lambda i: _sort_key(values[i], higher))
        for rank, i in enumerate(order):
            ranks[i] += rank
    best = min(range(len(results)), key=lambda i: (ranks[i], _sort_key(results[i].get("val_motion_psnr"), True)))
    return results[best]


def _sort_key(value: float | None, higher: bool) -> float:
    if value is None:
        return float("inf")
    return -value if higher else value


def untuned(cfg, why: str) -> dict:
    """The recipe's first candidates, recorded as they are, with the reason nothing was measured."""
    params = SamplingParams(cfg.steps, cfg.guidance[0], cfg.image_guidance[0])
    if len(candidates(cfg.guidance, cfg.image_guidance)) > 1:
        log.warning("sampling defaults not tuned (%s): recording the first candidates %s", why, params)
    return {**params.to_dict(), "tuned_on": None, "why": why}


def tune_sampling(pipe, val_pairs, resolution: int, template: str, cfg, seed: int, run_root: Path) -> dict:
    """{"steps", "guidance", "image_guidance", "tuned_on"} for lftk_model.json's "sampling"."""
    from lftk.eval.val import val_metrics

    grid = candidates(cfg.guidance, cfg.image_guidance)
    if len(grid) == 1:
        return untuned(cfg, "one candidate in the recipe")
    if not val_pairs:
        return untuned(cfg, "no val split to tune on")
    results = []
    for g, ig in grid:
        figures = val_metrics(pipe, val_pairs, resolution, template, max_samples=cfg.tune_samples, steps=cfg.steps,
                              guidance=g, image_guidance=ig, seed=seed)
        results.append({"guidance": g, "image_guidance": ig, **figures})
        log.info("sampling tune: guidance %.2f / image %.2f: %s", g, ig,
                 ", ".join(f"{k} {figures.get('val_' + k, float('nan')):.3f}" for k, _ in RANKED))
    best = pick(results)
    n = best.get("val_n", 0)
    (Path(run_root) / TUNE_FILE).write_text(json.dumps({"steps": cfg.steps, "samples": n, "results": results,
                                                        "best": best}, indent=2))
    log.info("sampling defaults: guidance %.2f / image %.2f (best of %d on %d val pairs; %s)",
             best["guidance"], best["image_guidance"], len(grid), n, TUNE_FILE)
    params = SamplingParams(cfg.steps, best["guidance"], best["image_guidance"])
    return {**params.to_dict(), "tuned_on": f"{n} val pairs, {len(grid)} candidates ({TUNE_FILE})"}
