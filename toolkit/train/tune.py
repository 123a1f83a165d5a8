"""Choose the sampling defaults a trained model records, by measurement on its val split.

Guidance scales matter as much as training for a small model: on the CPU demo, text/image guidance
7.5/1.5 (InstructPix2Pix's defaults, tuned for photographs) scored below 3.0/3.0 on every metric.
The recipe's `sampling` section lists candidate scales, `keep` thresholds (lftk.runtime.keep) and
`keep_objects` flags (lftk.runtime.objects); after training, each combination is scored with
`lftk eval`'s code on a fixed subset of the val split (never the test split), and the best one goes
into final/lftk_model.json, which eval, infer and serve read. The keep rules of one pair of scales
are scored on the same samples: they add no sampling.

Best = lowest mean rank over the four headline metrics (PSNR, PSNR where the scene moves, hand
error, objects missing), ties to the higher PSNR in motion: no single figure can buy the choice.
With `sampling.objects_margin`, candidates that miss more objects than copying the frame by more
than the margin are passed over first: a prediction should not erase what doing nothing keeps.
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


def keep_rules(cfg) -> list[tuple[float, bool]]:
    """Every (keep, keep_objects) of the recipe, scored on one sampling per pair of scales."""
    return list(itertools.product(cfg.keep, cfg.keep_objects))


def within_margin(results: list[dict], margin: float | None) -> list[dict]:
    """The results whose objects missing exceed the copy baseline's ("val_copy_obj_missing") by at most
    `margin`; all of them when `margin` is None or a figure is n/a; if none is within it, the one
    that misses the fewest objects."""
    if margin is None:
        return results

    def excess(r: dict) -> float | None:
        model, copy = r.get("val_obj_missing"), r.get("val_copy_obj_missing")
        return None if model is None or copy is None else model - copy

    if any(excess(r) is None for r in results):
        log.warning("sampling.objects_margin: objects missing is n/a on these val pairs; the bound is not applied")
        return results
    kept = [r for r in results if excess(r) <= margin + 1e-9]
    if kept:
        return kept
    fewest = min(results, key=excess)
    log.warning("sampling tune: no candidate misses at most %.2f more objects than copying the frame; the closest "
                "misses %.2f more (%s)", margin, excess(fewest), describe(fewest))
    return [fewest]


def describe(r: dict) -> str:
    return (f"guidance {r['guidance']:.2f} / image {r['image_guidance']:.2f} / keep {r.get('keep', 0):g}"
            f"{' / keep objects' if r.get('keep_objects') else ''}")


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
    params = SamplingParams(cfg.steps, cfg.guidance[0], cfg.image_guidance[0], cfg.keep[0], cfg.keep_objects[0])
    if len(candidates(cfg.guidance, cfg.image_guidance)) * len(keep_rules(cfg)) > 1:
        log.warning("sampling defaults not tuned (%s): recording the first candidates %s", why, params)
    return {**params.to_dict(), "tuned_on": None, "why": why}


def tune_sampling(pipe, val_pairs, resolution: int, template: str, cfg, seed: int, run_root: Path) -> dict:
    """{"steps", "guidance", "image_guidance", "keep", "keep_objects", "tuned_on"} for lftk_model.json's "sampling"."""
    from lftk.eval.val import val_metrics_by_keep

    grid = candidates(cfg.guidance, cfg.image_guidance)
    rules = keep_rules(cfg)
    n_candidates = len(grid) * len(rules)
    if n_candidates == 1:
        return untuned(cfg, "one candidate in the recipe")
    if not val_pairs:
        return untuned(cfg, "no val split to tune on")
    results = []
    for g, ig in grid:  # one sampling per pair of scales; every keep rule is scored on its frames
        by_keep = val_metrics_by_keep(pipe, val_pairs, resolution, template, cfg.tune_samples, cfg.steps, g, ig, seed,
                                      with_copy=cfg.objects_margin is not None, keeps=rules)
        for (keep, objects), figures in zip(rules, by_keep):
            results.append({"guidance": g, "image_guidance": ig, "keep": keep, "keep_objects": objects, **figures})
            log.info("sampling tune: %s: %s", describe(results[-1]),
                     ", ".join(f"{k} {figures.get('val_' + k, float('nan')):.3f}" for k, _ in RANKED))
    best = pick(within_margin(results, cfg.objects_margin))
    n = best.get("val_n", 0)
    (Path(run_root) / TUNE_FILE).write_text(json.dumps({"steps": cfg.steps, "samples": n, "objects_margin": cfg.objects_margin,
                                                        "results": results, "best": best}, indent=2))
    log.info("sampling defaults: %s (best of %d on %d val pairs; %s)", describe(best), n_candidates, n, TUNE_FILE)
    params = SamplingParams(cfg.steps, best["guidance"], best["image_guidance"], best["keep"], best["keep_objects"])
    return {**params.to_dict(), "tuned_on": f"{n} val pairs, {n_candidates} candidates ({TUNE_FILE})"}
