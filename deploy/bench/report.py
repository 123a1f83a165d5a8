"""What a bench run writes: the plain-text table, and one JSON line per run (machine, versions, rows)."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

from lftk.runtime.contract import CFG_BRANCHES


def machine_info() -> dict:
    import onnxruntime
    import torch

    import lftk

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "lftk": lftk.__version__,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def append_log(path: Path, rows: list[dict], model: Path) -> None:
    """One JSON line per bench run: when, where, on what, and the rows."""
    entry = {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": str(model),
        "machine": machine_info(),
        "rows": rows,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(entry) + "\n")


_COLUMNS = (  # header, row key, format
    ("backend", "backend", "{}"),
    ("precision", "precision", "{}"),
    ("status", "status", "{}"),
    ("size MB", "size_mb", "{:.1f}"),
    ("ms/UNet step", "ms_per_unet_step", "{:.2f}"),
    ("ms/frame", "ms_per_frame", "{:.1f}"),
    ("frames/s", "frames_per_s", "{:.2f}"),
    ("batched frames/s", "batched_frames_per_s", "{:.2f}"),
    ("peak RSS MB", "peak_mem_mb", "{:.0f}"),
    ("PSNR dB", "parity_psnr_db", "{:.1f}"),
    ("vs diffusers", "vs_diffusers", "{:.2f}x"),
)
_STATUS_WIDTH = 48  # the full reason is in the notes below the table and in --json


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    text = fmt.format(value)
    if key == "status" and len(text) > _STATUS_WIDTH:
        text = text[: _STATUS_WIDTH - 3] + "..."
    return text


def _guidance(s: dict) -> str:
    g, ig = s.get("guidance"), s.get("image_guidance")
    return "" if g is None or ig is None else f", guidance {g:g} / image {ig:g}"


def format_table(rows: list[dict]) -> str:
    """The rows as one plain-text table, with what each column measured underneath."""
    columns = _COLUMNS
    if len({r["steps"] for r in rows}) > 1:  # a trade-off run: which step count each row is at
        columns = columns[:2] + (("steps", "steps", "{}"),) + columns[2:]
    cells = [[h for h, _, _ in columns]] + [[_cell(r, k, f) for _, k, f in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if rows:
        s = rows[0]
        n = s["frames"]
        b = s.get("branches", CFG_BRANCHES)
        steps = ", ".join(str(c) for c in dict.fromkeys(r["steps"] for r in rows))
        lines += [
            "",
            f"{s['resolution']} px, {steps} steps, {s['scheduler']}{_guidance(s)}, seed {s['seed']}; medians of {s['repeats']} repeat(s) after {s['warmup']} warm-up; "
            f"threads: torch {s['threads']['torch']}, onnxruntime {s['threads']['onnxruntime']}.",
            f"ms/UNet step: one call, 1 frame x {b} guidance branch{'es' if b > 1 else ''}. ms/frame, frames/s: a {n}-frame rollout "
            f"as {n} single-frame calls.",
            f"batched frames/s: {n} independent start frames in one Runner.predict call, one UNet call per step "
            f"(batch {b * n}).",
            "peak RSS: the process during the row (includes libraries loaded before). PSNR: batched frames vs torch fp32.",
            "diffusers: the stock StableDiffusionInstructPix2PixPipeline on the same weights, scheduler, steps, guidance "
            "and seed (no keep rules; its PSNR is against torch fp32 without them). vs diffusers: its ms/frame over "
            "the row's (same precision, else fp32); > 1 is faster.",
        ]
        for r in rows:
            if len(r["status"]) > _STATUS_WIDTH:
                lines.append(f"{r['backend']} {r['precision']}: {r['status']}")
    return "\n".join(lines)
