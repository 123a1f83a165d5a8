"""`lftk eval MODEL --data DIR`: predict each test pair's future frame, score it against the truth
and against baselines, write report.json, report.md and grid.png.

Everything is compared at the model's resolution: truth and input are loaded with the same
resize policy the model was trained with (`load_rgb(path, resolution)`), so a baseline is never
penalised or favoured by a resize the model did not see.
"""

from __future__ import annotations

import logging
import sys
import time
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from lftk.data.images import load_rgb
from lftk.data.inspect import spread_indices
from lftk.data.pairset import Pair, PairSet, format_prompt
from lftk.errors import LftkError
from lftk.eval.methods import (
    MODEL_METHOD,
    EvalItem,
    EvalSettings,
    PipelinePredictor,
    Predictor,
    check_baselines,
    make_baselines,
)
from lftk.eval.metrics import METRICS, PSNR_CAP_DB, frame_metrics
from lftk.eval.report import GRID_ROWS, per_task, summarize, write_grid, write_report

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "{instruction}"


def sample_seed(seed: int, name: str) -> int:
    """Noise seed of one sample: fixed by (seed, sample name), whatever else is evaluated with it."""
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])


def _items(batch: Sequence[Pair], settings: EvalSettings) -> list[EvalItem]:
    return [
        EvalItem(
            pair=p,
            current=load_rgb(p.current, settings.resolution),
            prompt=format_prompt(settings.prompt_template, p.instruction),
            seed=sample_seed(settings.seed, p.name),
        )
        for p in batch
    ]


def _row(item: EvalItem, metrics: dict) -> dict:
    p = item.pair
    return {
        "sample": p.name,
        "task": p.task,
        "episode": p.prompt.get("episode"),
        "frame": p.prompt.get("frame"),
        "instruction": p.instruction,
        "seed": item.seed,
        "metrics": metrics,  # method -> frame_metrics
    }


def score(
    pairs: Sequence[Pair],
    methods: dict[str, Predictor],
    settings: EvalSettings,
    show: Sequence[int] = (),
) -> tuple[list[dict], list[dict]]:
    """Per-sample rows with every method's metrics, and the frames of the samples at indices `show`
    (their prediction is the first method's: the model, in `evaluate`)."""
    from lftk.progress import progress_bar

    rows, shown, keep = [], [], set(show)
    first = next(iter(methods))
    tty = sys.stderr.isatty()
    with progress_bar("eval", total=len(pairs)) as advance:
        for start in range(0, len(pairs), settings.batch_size):
            batch = pairs[start : start + settings.batch_size]
            items = _items(batch, settings)
            truths = [load_rgb(p.future, settings.resolution) for p in batch]
            preds = {name: predict(items) for name, predict in methods.items()}
            for j, (item, truth) in enumerate(zip(items, truths)):
                metrics = {name: frame_metrics(preds[name][j], truth) for name in methods}
                rows.append(_row(item, metrics))
                if start + j in keep:
                    frames = {"input": item.current, "truth": truth, "prediction": preds[first][j]}
                    shown.append({"name": item.pair.name, "metrics": metrics[first], **frames})
            advance(len(batch))
            if not tty:
                log.info("eval: %d/%d samples", len(rows), len(pairs))
    return rows, shown


def _load_model(model: str | Path, device: str):
    from lftk.model.base import load_pipeline, read_meta
    from lftk.model.resolve import resolve_model

    ref = resolve_model(model)
    if ref.pipeline_dir is None:
        raise LftkError(f"{model}: this {ref.kind} dir holds no diffusers pipeline to evaluate with torch")
    pipe = load_pipeline(ref.pipeline_dir)
    pipe.to(device)
    return ref, pipe, read_meta(ref.pipeline_dir)


def _resolution(meta: dict, pipe) -> int:
    size = meta.get("resolution") or pipe.vae.config.sample_size
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    factor = pipe.vae_scale_factor
    if size % factor:
        raise LftkError(f"model resolution {size} is not a multiple of the VAE's downsampling factor {factor}")
    return size


def _check_args(steps: int, max_samples: int | None, batch_size: int) -> None:
    if steps < 1:
        raise LftkError(f"steps must be >= 1, got {steps}")
    if max_samples is not None and max_samples < 1:
        raise LftkError(f"max_samples must be >= 1, got {max_samples}")
    if batch_size < 1:
        raise LftkError(f"batch_size must be >= 1, got {batch_size}")


def _versions() -> dict:
    import diffusers
    import torch

    import lftk

    return {"lftk": lftk.__version__, "diffusers": diffusers.__version__, "torch": torch.__version__}


def evaluate(
    model: str | Path,
    data: Path,
    out: Path,
    split: str = "test",
    steps: int = 20,
    guidance: float = 7.5,
    image_guidance: float = 1.5,
    seed: int = 0,
    max_samples: int | None = None,
    baselines: Sequence[str] = ("copy",),
    batch_size: int = 4,
    device: str = "cpu",
) -> dict:
    """Evaluate MODEL on `data/<split>`; writes OUT/report.json, report.md, grid.png and returns the report.

    `max_samples` takes that many samples spread evenly over the split (so every task is seen),
    not the first ones.
    """
    _check_args(steps, max_samples, batch_size)
    names = check_baselines(baselines)  # before the model loads: a typo should cost nothing
    data, out = Path(data), Path(out)
    pairs = PairSet(data, split)
    if not len(pairs):
        raise LftkError(f"{data / split}: no samples to evaluate")
    picks = [pairs[i] for i in spread_indices(len(pairs), max_samples)]

    t0 = time.perf_counter()
    ref, pipe, meta = _load_model(model, device)
    settings = EvalSettings(
        resolution=_resolution(meta, pipe),
        prompt_template=meta.get("prompt_template") or DEFAULT_TEMPLATE,
        steps=steps,
        guidance=guidance,
        image_guidance=image_guidance,
        seed=seed,
        batch_size=batch_size,
        device=device,
    )
    format_prompt(settings.prompt_template, "x")  # a broken template fails here, not mid-run
    load_s = time.perf_counter() - t0
    methods: dict[str, Predictor] = {MODEL_METHOD: PipelinePredictor(pipe, settings)}
    methods.update(make_baselines(names, settings))
    log.info(
        "evaluating %s on %d samples of %s (%s) at %d px",
        ref.path, len(picks), data / split, ", ".join(methods), settings.resolution,
    )

    t1 = time.perf_counter()
    rows, shown = score(picks, methods, settings, show=spread_indices(len(picks), GRID_ROWS))
    score_s = time.perf_counter() - t1
    method_names = list(methods)
    overall = summarize(rows, method_names)
    report = {
        "model": str(ref.path.resolve()),
        "model_kind": ref.kind,
        "pipeline_dir": str(ref.pipeline_dir.resolve()),
        "data": str(data.resolve()),
        "split": split,
        "n_samples": len(rows),
        "n_split": len(pairs),
        "methods": method_names,
        "metrics": [{"name": m.name, "label": m.label, "higher_is_better": m.higher_is_better} for m in METRICS],
        "psnr_cap_db": PSNR_CAP_DB,
        "settings": {
            "resolution": settings.resolution,
            "prompt_template": settings.prompt_template,
            "steps": steps,
            "guidance": guidance,
            "image_guidance": image_guidance,
            "seed": seed,
            "max_samples": max_samples,
            "batch_size": batch_size,
            "device": device,
            "baselines": names,
        },
        "means": overall["means"],
        "per_task": per_task(rows, method_names),
        "timing": {
            "load_s": round(load_s, 3),
            "score_s": round(score_s, 3),  # every method, metrics included
            "s_per_sample": round(score_s / len(rows), 4),
        },
        "versions": _versions(),
        "rows": rows,
    }
    write_report(out, report)
    write_grid(out, shown, settings.resolution)
    m = report["means"][MODEL_METHOD]
    log.info(
        "model: SSIM %.4f, PSNR %.2f dB, MSE %.2f over %d samples; report in %s",
        m["ssim"], m["psnr"], m["mse"], len(rows), out,
    )
    return report
