"""Evaluation outputs: report.json (every figure), report.md (the table a person reads), grid.png.

Per-sample rows are the source of truth; means (and later confidence intervals) are derived from
them by `summarize`, so the overall and per-task tables can never disagree with the rows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from lftk.data.inspect import contact_sheet
from lftk.eval.metrics import METRICS, PSNR_CAP_DB

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
GRID_PNG = "grid.png"
GRID_ROWS = 8


def summarize(rows: Sequence[dict], methods: Sequence[str]) -> dict:
    """{"n": samples, "means": {method: {metric: mean, "psnr_capped": count}}} over `rows`.

    PSNR means use the capped per-sample values: an uncapped mean is infinite as soon as one
    prediction is exact.
    """
    means = {}
    for method in methods:
        per = [r["metrics"][method] for r in rows]
        stats = {m.name: float(np.mean([p[m.name] for p in per])) for m in METRICS}
        stats["psnr_capped"] = sum(bool(p["psnr_capped"]) for p in per)
        means[method] = stats
    return {"n": len(rows), "means": means}


def per_task(rows: Sequence[dict], methods: Sequence[str]) -> dict:
    tasks = sorted({r["task"] for r in rows})
    return {t: summarize([r for r in rows if r["task"] == t], methods) for t in tasks}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # a reader never sees half a report


def _heads() -> list[str]:
    return [f"{m.label} {'↑' if m.higher_is_better else '↓'}" for m in METRICS]


def _cells(means: dict, method: str) -> str:
    stats = means[method]
    cells = [f"{stats[m.name]:.4f}" if m.name == "ssim" else f"{stats[m.name]:.2f}" for m in METRICS]
    return f"| {method} | " + " | ".join(cells) + " |"


def render_markdown(report: dict) -> str:
    methods = report["methods"]
    s = report["settings"]
    heads = _heads()
    out = [
        f"# lftk eval: `{report['model']}`",
        "",
        f"{report['n_samples']} samples of split `{report['split']}` in `{report['data']}`, "
        f"at {s['resolution']} px; {s['steps']} steps, guidance {s['guidance']}, "
        f"image guidance {s['image_guidance']}, seed {s['seed']}.",
        "",
        "| method | " + " | ".join(heads) + " |",
        "|---" * (len(heads) + 1) + "|",
        *(_cells(report["means"], m) for m in methods),
        "",
        "## Per task",
        "",
        "| task | n | method | " + " | ".join(heads) + " |",
        "|---" * (len(heads) + 3) + "|",
    ]
    for task, summary in report["per_task"].items():
        out.extend(f"| {task} | {summary['n']} " + _cells(summary["means"], m) for m in methods)
    capped = {m: report["means"][m]["psnr_capped"] for m in methods if report["means"][m]["psnr_capped"]}
    out += ["", f"PSNR of an exact prediction is infinite; it is counted as {PSNR_CAP_DB:g} dB."]
    if capped:
        out.append("Capped samples: " + ", ".join(f"{m} {n}" for m, n in capped.items()) + ".")
    return "\n".join(out) + "\n"


def write_report(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: a NaN or inf that slipped through is a bug to see now, not invalid JSON later.
    _write_atomic(out / REPORT_JSON, json.dumps(report, indent=2, allow_nan=False).encode())
    _write_atomic(out / REPORT_MD, render_markdown(report).encode())


def write_grid(out: Path, shown: Sequence[dict], resolution: int) -> Path:
    """grid.png: rows input | truth | prediction, each captioned with its sample and model figures."""
    rows = [[s["input"], s["truth"], s["prediction"]] for s in shown]
    labels = [
        f"{s['name']}  SSIM {s['metrics']['ssim']:.3f}  PSNR {s['metrics']['psnr']:.1f} dB" for s in shown
    ]
    cell = int(min(max(resolution, 128), 256))  # big enough for the captions, small enough to open anywhere
    sheet = contact_sheet(rows, ["input", "truth", "prediction (model)"], labels, cell=cell)
    path = out / GRID_PNG
    tmp = path.with_name(f".{path.name}.tmp")
    sheet.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
