"""`lftk eval MODEL --data DIR`: predict each test pair's future frame, score it against the truth
beside the baselines, write report.json, report.md and the figures.

Everything is compared at the model's resolution: truth and input are loaded with the same
resize policy the model was trained with (`load_rgb(path, resolution)`), so a baseline is never
penalised or favoured by a resize the model did not see.
"""

from __future__ import annotations

import logging
import sys
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lftk.data.images import load_rgb
from lftk.data.inspect import spread_indices
from lftk.data.pairset import Pair, PairSet, template_fields
from lftk import atomic
from lftk.errors import LftkError
from lftk.eval.methods import (
    BASELINES,
    DEFAULT_BASELINES,
    MODEL_METHOD,
    EvalSettings,
    PIPELINE_BACKEND,
    PipelinePredictor,
    Predictor,
    RunnerPredictor,
    check_baselines,
    make_baselines,
    make_items,
)
from lftk.eval.metrics import PSNR_CAP_DB
from lftk.eval.motion import MOTION_THRESHOLD, dilation_radius
from lftk.eval.perceptual import load_lpips
from lftk.model.postprocess import make_postprocess, parse_steps
from lftk.eval.rollout import ROLLOUT_SAMPLES, run_rollout
from lftk.runtime.resolution import pick_resolution
from lftk.runtime.runner import check_guidance, prompting
from lftk.runtime.params import META_KEY as SAMPLING_KEY, SamplingParams
from lftk.eval.scoring import COLUMNS, add_errors, build_target, row_base, score_prediction

log = logging.getLogger(__name__)

GRID_ROWS = 8


def _row(pair: Pair, seed: int, base: dict) -> dict:
    p = pair.prompt
    return {
        "sample": pair.name,
        "task": pair.task,
        "episode": p.get("episode"),
        "frame": p.get("frame"),
        "horizon": p.get("horizon"),
        "instruction": pair.instruction,
        "seed": seed,
        **base,
        "metrics": {},  # method -> metric -> value (None: n/a, see "na")
    }


def score(
    pairs: Sequence[Pair],
    methods: dict[str, Predictor],
    settings: EvalSettings,
    show: Sequence[int] = (),
    lpips: Callable | None = None,
    quiet: bool = False,
    keep: dict | None = None,
) -> tuple[list[dict], list[dict]]:
    """Per-sample rows with every method's metrics, and the frames of the samples at indices `show`
    (their prediction is the first method's: the model, in `evaluate`). `keep`, when given, collects
    the first method's predictions by sample name."""
    from lftk.progress import progress_bar

    rows, shown, show_at = [], [], set(show)
    first = next(iter(methods))
    tty = sys.stderr.isatty()
    with progress_bar("eval", total=len(pairs), enabled=not quiet) as advance:
        for start in range(0, len(pairs), settings.batch_size):
            batch = pairs[start : start + settings.batch_size]
            items = make_items(batch, settings)
            targets = [
                build_target(it.current, load_rgb(p.future, settings.resolution), p.prompt,
                             p.prompt.get("frame"), p.prompt.get("future_frame"))
                for it, p in zip(items, batch)
            ]
            preds = {name: predict(items) for name, predict in methods.items()}
            for j, (item, target) in enumerate(zip(items, targets)):
                row = _row(item.pair, item.seed, row_base(target))
                for name in methods:
                    row["metrics"][name], errors = score_prediction(preds[name][j], target, lpips)
                    add_errors(row, name, errors)
                rows.append(row)
                if keep is not None:
                    keep[item.pair.name] = preds[first][j]
                if start + j in show_at:
                    frames = {"input": item.current, "truth": target.truth, "prediction": preds[first][j]}
                    shown.append({"name": item.pair.name, "metrics": row["metrics"][first], **frames})
            advance(len(batch))
            if not tty and not quiet:
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


def _open_runner(model: str | Path, backend: str, precision: str | None):
    """(ModelRef, meta, Runner) for `lftk eval --backend`: the backend `lftk infer` opens for it."""
    from lftk.model.base import read_meta
    from lftk.model.resolve import resolve_model
    from lftk.runtime.backends import open_backend
    from lftk.runtime.runner import Runner

    ref = resolve_model(model)
    be = open_backend(model, backend, precision=precision)
    return ref, read_meta(Path(be.pipeline_dir)), Runner.from_backend(be)


def _setup(model: str | Path, device: str, baselines: Sequence[str], sampling: dict, backend: str | None = None,
           precision: str | None = None, **knobs):
    """Load the model; its settings (resolution and prompt template as trained, sampling parameters
    as recorded by the model unless given in `sampling`); the predictors of the model and the
    baselines that can be had; {name: reason} for those that cannot; LPIPS or None. `backend` None:
    the model through diffusers' pipeline; torch | ort | trt: through lftk's runner on that backend."""
    runner = None
    if backend is None:
        if precision is not None:
            raise LftkError("--precision picks the graphs or engines of a backend: give --backend torch, ort or trt with it")
        ref, pipe, meta = _load_model(model, device)
        resolution = pick_resolution(ref.pipeline_dir, pipe)
        ran_on = {"backend": PIPELINE_BACKEND, "precision": "fp32"}
    else:
        ref, meta, runner = _open_runner(model, backend, precision)
        resolution = runner.resolution
        ran_on = {"backend": runner.backend.name, "precision": getattr(runner.backend, "precision", "fp32")}
    params = SamplingParams.for_model(meta, **sampling)
    check_guidance(meta.get("distilled"), params.guidance, params.image_guidance)  # a student's is built in
    settings = EvalSettings(
        resolution=resolution,
        prompt_template=prompting(meta)[0],
        device=device,
        steps=params.steps,
        guidance=params.guidance,
        image_guidance=params.image_guidance,
        keep=params.keep,
        keep_objects=params.keep_objects,
        **ran_on,
        **knobs,
    )
    template_fields(settings.prompt_template)  # a broken template fails here, not mid-run
    model_predictor = PipelinePredictor(pipe, settings) if runner is None else RunnerPredictor(runner, settings)
    methods: dict[str, Predictor] = {MODEL_METHOD: model_predictor}
    baseline_predictors, unavailable = make_baselines(baselines, settings, meta)
    methods.update(baseline_predictors)
    lpips, why_not_lpips = load_lpips()
    if lpips is None:
        unavailable["lpips"] = why_not_lpips
    return ref, meta, settings, methods, unavailable, lpips


def _check_horizons(pairs: Sequence[Pair], template: str, meta: dict) -> None:
    """Before any scoring: every pair's prompt can be made (a template with {horizon} needs each
    pair's horizon), and a warning when the pairs look further ahead than the model was trained to."""
    for p in pairs:
        p.format(template)
    trained = prompting(meta)[1]
    unseen = sorted({p.horizon for p in pairs if p.horizon is not None} - set(trained))
    if trained and unseen:
        log.warning("evaluating on horizon(s) %s the model was not trained on (trained: %s)", unseen, trained)


class _Memo:
    """The model's predictions of the batch just scored, kept so post-processed variants reuse them."""

    def __init__(self, predict: Predictor):
        self.predict = predict
        self._last: tuple[list, list] | None = None

    def __call__(self, items):
        # The items themselves are kept (not their ids, which Python reuses once an object is freed).
        last = self._last
        if last is None or len(last[0]) != len(items) or any(a is not b for a, b in zip(last[0], items)):
            self._last = (list(items), self.predict(items))
        return self._last[1]


def with_postprocess(methods: dict[str, Predictor], steps: Sequence[str]) -> dict[str, Predictor]:
    """`methods` plus "model+STEP" for each post-processing step and, with several, "model+A+B" for the
    chain: the same predictions (sampled once), post-processed, so the table shows each step's effect."""
    if not steps:
        return methods
    memo = _Memo(methods[MODEL_METHOD])
    variants = [(s,) for s in steps] + ([tuple(steps)] if len(steps) > 1 else [])
    out: dict[str, Predictor] = {MODEL_METHOD: memo}
    for variant in variants:
        fn = make_postprocess(variant)

        def predict(items, fn=fn):
            return list(fn(np.stack(memo(items)), np.stack([it.current for it in items])))

        out["+".join((MODEL_METHOD, *variant))] = predict
    out.update((k, v) for k, v in methods.items() if k != MODEL_METHOD)
    return out


def _sampling_source(given: dict, meta: dict) -> str:
    """Where the sampling parameters came from, for the report."""
    if all(v is not None for v in given.values()):
        return "given"
    recorded = meta.get(SAMPLING_KEY) or {}
    own = "the model's lftk_model.json" + (f" (tuned on {recorded['tuned_on']})" if recorded.get("tuned_on") else "")
    source = own if recorded else "lftk's defaults"
    return source if all(v is None for v in given.values()) else f"given, else {source}"


def _check_args(steps: int | None, max_samples: int | None, batch_size: int, rollout_steps: int, rollout_samples: int) -> None:
    problems = []
    if steps is not None and steps < 1:
        problems.append(f"steps must be >= 1, got {steps}")
    if max_samples is not None and max_samples < 1:
        problems.append(f"max_samples must be >= 1, got {max_samples}")
    if batch_size < 1:
        problems.append(f"batch_size must be >= 1, got {batch_size}")
    if rollout_steps < 2:
        problems.append(f"rollout_steps must be >= 2 (step 1 is the model itself), got {rollout_steps}")
    if rollout_samples < 1:
        problems.append(f"rollout_samples must be >= 1, got {rollout_samples}")
    if problems:
        raise LftkError("; ".join(problems))


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
    steps: int | None = None,
    guidance: float | None = None,
    image_guidance: float | None = None,
    seed: int = 0,
    max_samples: int | None = None,
    baselines: Sequence[str] = DEFAULT_BASELINES,
    keep: float | None = None,
    keep_objects: bool | None = None,
    batch_size: int = 4,
    device: str = "cpu",
    rollout_steps: int = 2,
    rollout_samples: int = ROLLOUT_SAMPLES,
    postprocess: Sequence[str] = (),
    backend: str | None = None,
    precision: str | None = None,
) -> dict:
    """Evaluate MODEL on `data/<split>`; writes OUT/report.json, report.md and figures, returns the report.

    `max_samples` takes that many samples spread evenly over the split (so every task is seen),
    not the first ones. A baseline or metric that cannot be had here is listed in the report's
    "unavailable" with the reason; the rest of the evaluation goes on. `steps`, `guidance`,
    `image_guidance`, `keep` and `keep_objects` left None are the model's own (lftk_model.json "sampling"), else SamplingParams'.
    """
    from lftk.eval.figures import write_figures
    from lftk.eval.report import build_sections, write_report

    _check_args(steps, max_samples, batch_size, rollout_steps, rollout_samples)
    names = check_baselines(baselines)  # before the model loads: a typo should cost nothing
    post = parse_steps(postprocess)
    data, out = Path(data), Path(out)
    _check_out(out)
    pairs = PairSet(data, split)
    if not len(pairs):
        raise LftkError(f"{data / split}: no samples to evaluate")
    picks = [pairs[i] for i in spread_indices(len(pairs), max_samples)]

    t0 = time.perf_counter()
    given = {"steps": steps, "guidance": guidance, "image_guidance": image_guidance, "keep": keep, "keep_objects": keep_objects}
    ref, meta, settings, methods, unavailable, lpips = _setup(
        model, device, names, given, backend=backend, precision=precision, seed=seed, batch_size=batch_size,
    )
    model_predict = methods[MODEL_METHOD]
    methods = with_postprocess(methods, post)
    load_s = time.perf_counter() - t0
    _check_horizons(picks, settings.prompt_template, meta)
    log.info(
        "evaluating %s on %d samples of %s (%s) at %d px",
        ref.path, len(picks), data / split, ", ".join(methods), settings.resolution,
    )

    t1 = time.perf_counter()
    model_preds: dict = {}
    rows, shown = score(picks, methods, settings, show=spread_indices(len(picks), GRID_ROWS), lpips=lpips,
                        keep=model_preds if "rollout" in names else None)
    score_s = time.perf_counter() - t1
    rollout = None
    t2 = time.perf_counter()
    if "rollout" in names:
        rollout, why = run_rollout(picks, model_predict, settings, rollout_steps, rollout_samples, model_preds)
        if rollout is None:
            log.warning("rollout baseline unavailable: %s", why)
            unavailable["rollout"] = why
    rollout_s = time.perf_counter() - t2

    method_names = list(methods)
    report = {
        "model": str(ref.path.resolve()),
        "model_kind": ref.kind,
        "pipeline_dir": str(ref.pipeline_dir.resolve()),
        "base": meta.get("base"),
        "data": str(data.resolve()),
        "split": split,
        "n_samples": len(rows),
        "n_split": len(pairs),
        "methods": method_names,
        "baselines": {n: BASELINES[n].description for n in names},
        "unavailable": unavailable,
        "columns": [
            {"name": c.name, "label": c.label, "higher_is_better": c.higher_is_better, "group": c.group}
            for c in COLUMNS
        ],
        "psnr_cap_db": PSNR_CAP_DB,
        "settings": {
            "resolution": settings.resolution,
            "prompt_template": settings.prompt_template,
            "steps": settings.steps,
            "guidance": settings.guidance,
            "image_guidance": settings.image_guidance,
            "keep": settings.keep,
            "keep_objects": settings.keep_objects,
            "backend": settings.backend,
            "precision": settings.precision,
            "sampling_from": _sampling_source(given, meta),
            "seed": seed,
            "max_samples": max_samples,
            "batch_size": batch_size,
            "device": device,
            "baselines": names,
            "postprocess": list(post),
            "rollout_steps": rollout_steps if "rollout" in names else None,
            "rollout_samples": rollout_samples if "rollout" in names else None,
            "motion_threshold": MOTION_THRESHOLD,
            "motion_dilation_px": dilation_radius(settings.resolution),
        },
        **build_sections(rows, method_names, rollout),
        "timing": {
            "load_s": round(load_s, 3),
            "score_s": round(score_s, 3),  # every per-pair method, metrics included
            "s_per_sample": round(score_s / len(rows), 4),
            "rollout_s": round(rollout_s, 3),
        },
        "versions": _versions(),
        "rows": rows,
    }
    # The report dir is written whole beside OUT and swapped in: never new figures beside an old report.
    tmp = atomic.staging_dir(out)
    try:
        report["figures"] = write_figures(tmp, report, shown, rollout)
        write_report(tmp, report)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic.swap_in(tmp, out)
    _log_headline(report, out)
    return report


def _check_out(out: Path) -> None:
    """OUT is replaced whole, so it must be new, empty, or an earlier report dir (never a dir of other files)."""
    from lftk.eval.report import REPORT_JSON

    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / REPORT_JSON).is_file())):
        raise LftkError(f"{out}: exists and is not a report dir (no {REPORT_JSON}); the report replaces its --out "
                        "dir whole: choose a new or empty dir")


def _log_headline(report: dict, out: Path) -> None:
    s = report["summary"]
    for method in report["methods"]:
        m = s[method]
        log.info(
            "%s: PSNR %s dB, PSNR in motion %s dB, object error %s px (%d samples)",
            method, _fmt(m["psnr"]["mean"]), _fmt(m["motion_psnr"]["mean"]), _fmt(m["obj_err_px"]["mean"]),
            report["n_samples"],
        )
    log.info("report in %s", out)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"
