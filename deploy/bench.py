"""`lftk bench`: every backend and precision of one export, timed the same way, checked against torch.

One row per (backend, precision): the torch modules (fp32, the reference; fp16 too on a CUDA machine;
with `compile` a torch.compile row), each ONNX precision the
manifest lists (`targets_in`) under onnxruntime, each TensorRT engine set. A row that cannot run
here says why ("not available: TensorRT not installed") instead of vanishing. Per row:

  ms/UNet step   one UNet call with 1 frame x the CFG branches (batch 3), mean over a rollout,
                 median over repeats, after warm-up
  ms/frame, f/s  a FRAMES-frame autoregressive rollout done as FRAMES single-frame predict calls
  batched f/s    FRAMES independent start frames predicted together by one `Runner.predict`
                 call: one UNet call per step at batch 3 x FRAMES (the sweep-style batch)
  peak RSS       the process's resident memory during the row, sampled (it includes whatever the
                 process loaded before: libraries, earlier rows' allocator pools)
  PSNR           the batched frames against torch fp32's for the same inputs and seed (torch's
                 own row is the reference: "-")

MODEL may also be a pipeline or run dir (no ONNX export yet): then only torch rows run, and the ort
and trt rows say what to export first. That is how a full-size model is timed on a GPU without
writing gigabytes of ONNX (`--resolution` picks the size; an export's is fixed by its manifest).

`run_bench` returns the rows; `format_table` renders them (the CLI prints it). `--json` writes the
rows; `--log` appends them, with the machine and versions, as one JSON line per run.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import platform
import statistics
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from lftk.runtime.backends import BACKENDS, Backend, OrtBackend, TorchBackend, TrtBackend
from lftk.runtime.runner import Runner
from lftk.errors import LftkError, NotAvailableError
from lftk.runtime.contract import CFG_BRANCHES, COMPONENTS, MAX_FRAMES
from lftk.runtime.manifest import component_files, verify_manifest
from lftk.export.parity import FRAME_PSNR_MIN_DB, parity_image
from lftk.eval.metrics import psnr_db
from lftk.runtime.precision import Format, targets_in
from lftk.model.resolve import resolve_model

log = logging.getLogger(__name__)

DEFAULT_FRAMES = 15
DEFAULT_STEPS = 4  # per-step and per-frame figures scale with steps; few keep a tiny-model CPU run near a minute
DEFAULT_WARMUP = 1
DEFAULT_REPEATS = 2
INSTRUCTION = "stack the blocks"
KEYS = (
    "backend", "precision", "status", "ms_per_unet_step", "ms_per_frame", "frames_per_s",
    "batched_frames_per_s", "peak_mem_mb", "parity_psnr_db",
)  # what --json promises; rows carry a few more (size_mb, providers, settings)
# Against torch fp32: fp32 graphs must match it as export parity does; fp16 as the engine check
# does; int8 as the int8 export gate does (30 dB, or 3 dB closer than a change of seed).
PARITY_MIN_DB = {"fp32": FRAME_PSNR_MIN_DB, "fp16": 30.0}
INT8_GOOD_DB, INT8_MARGIN_DB = 30.0, 3.0
_RSS_POLL_S = 0.05
REFERENCE = ("torch", "fp32")  # the row every other row's frames are compared with


def _rss_reader():
    """A function returning this process's resident bytes now: psutil (not a declared dependency)
    where installed, else /proc (Linux), else the lifetime peak from getrusage."""
    try:
        import psutil

        proc = psutil.Process()
        return lambda: proc.memory_info().rss
    except ImportError:
        pass
    statm = Path("/proc/self/statm")
    if statm.is_file():
        page = os.sysconf("SC_PAGE_SIZE")
        return lambda: int(statm.read_text().split()[1]) * page
    import resource

    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class _PeakRss:
    """Peak resident memory of this process while the block runs (a sampling thread), in MB."""

    def __init__(self):
        self._rss = _rss_reader()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _sample(self):
        self.peak = max(self.peak, self._rss())

    def _poll(self):
        while not self._stop.wait(_RSS_POLL_S):
            self._sample()

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def mb(self) -> float:
        return round(self.peak / 2**20, 1)


def _cuda_peak_reset() -> bool:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return True
    return False


def _cuda_peak_mb() -> float:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def _cases(manifest: dict, backends: Sequence[str], compile: bool = False) -> list[tuple[str, str]]:
    """(backend, precision) rows in table order; trt gets a row even when the export has no engines.
    torch: fp32 eager (the reference), fp16 eager on a CUDA machine, and with `compile` a
    "torch-compile" row at the precision a user would run it (fp16 on CUDA, fp32 on CPU)."""
    import torch

    rows = []
    targets = targets_in(manifest) if manifest is not None else []
    cuda = torch.cuda.is_available()
    for backend in backends:
        if backend == "torch":
            rows.append(REFERENCE)
            if cuda:
                rows.append(("torch", "fp16"))
            if compile:
                rows.append(("torch-compile", "fp16" if cuda else "fp32"))
        elif backend == "ort":
            rows += [("ort", t.precision.value) for t in targets if t.format == Format.ONNX] or [("ort", "-")]
        else:
            engines = [("trt", t.precision.value) for t in targets if t.format == Format.TRT]
            rows += engines or [("trt", "-")]
    return rows


def _trt_missing() -> str | None:
    """Why TensorRT cannot run here, in a few words; None when it can."""
    from lftk.runtime.trt_engine import machine

    info = machine()
    why = []
    if info["tensorrt"] is None:
        why.append("TensorRT not installed")
    if not info["cuda"]:
        why.append("no CUDA GPU")
    return ", ".join(why) or None


def _ort_providers(precision: str) -> list[str]:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if precision == "fp16":  # the table's fp16 graph is for GPU providers: on CPU it would be slower, not faster
        raise NotAvailableError("fp16 graphs run on GPU providers; this onnxruntime has CPUExecutionProvider only")
    return ["CPUExecutionProvider"]


def _open(
    export_dir: Path, manifest: dict | None, pipeline_dir: Path | None, backend: str, precision: str, threads: int,
    resolution: int,
) -> Backend:
    if backend in ("torch", "torch-compile"):
        if pipeline_dir is None:
            raise NotAvailableError("the export has no pipeline/ copy (the torch backend needs the diffusers weights)")
        return TorchBackend(pipeline_dir, resolution, precision=precision, compile=backend == "torch-compile")
    if manifest is None:
        raise NotAvailableError(
            f"{export_dir} is not an export (no ONNX graphs or engines): run `lftk export {export_dir} --onnx "
            "--out EXPORT_DIR` and pass --model EXPORT_DIR"
        )
    if backend == "ort":
        return OrtBackend(export_dir, _ort_providers(precision), threads=threads, precision=precision, manifest=manifest)
    missing = _trt_missing()
    if missing:
        raise NotAvailableError(missing)
    if precision == "-":
        raise NotAvailableError(
            f"no TensorRT engines in this export (build them here: lftk export {export_dir} --no-onnx --trt "
            f"--precision fp16 --out {export_dir})"
        )
    return TrtBackend(export_dir, precision, manifest=manifest)


def _size_mb(export_dir: Path, manifest: dict | None, pipeline_dir: Path | None, backend: str, precision: str) -> float | None:
    """MB of the files the backend loads: the diffusers weights, the ONNX graphs, or the engines."""
    if backend in ("torch", "torch-compile"):
        if pipeline_dir is None:
            return None
        files = [p for c in COMPONENTS for p in _weights(pipeline_dir, c)]
        return round(sum(p.stat().st_size for p in files) / 1e6, 2)
    if manifest is None:
        return None
    if backend == "ort":
        recs = [r for c in COMPONENTS for r in component_files(manifest, c, precision)]
    else:
        engines = manifest.get("engines", {}).get(precision, {}).get("components", {})
        recs = [f for rec in engines.values() for f in rec.get("files", [])]
        if not recs:
            return None
    return round(sum(r["bytes"] for r in recs) / 1e6, 2)


def _weights(pipeline_dir: Path, component: str) -> list[Path]:
    sub = {"text_encoder": "text_encoder", "vae_encoder": "vae", "vae_decoder": "vae", "unet": "unet"}[component]
    if component == "vae_decoder":  # one vae/ dir holds both halves: count it once
        return []
    return [p for p in (pipeline_dir / sub).glob("*") if p.suffix in (".safetensors", ".bin")]


def _measure(runner: Runner, starts: np.ndarray, frames: int, steps: int, warmup: int, repeats: int, seed: int):
    """Timings (medians over repeats) and the batched frames of the last repeat."""
    be = runner.backend
    for _ in range(warmup):  # both batch shapes: ORT and TensorRT plan per shape on first sight
        runner.predict(starts[:1], INSTRUCTION, steps, seed=seed)
        runner.predict(starts, INSTRUCTION, steps, seed=seed)
    unet_ms, single_s, batched_s, batched_unet_ms = [], [], [], []
    batched = None
    for _ in range(repeats):
        be.reset_stats()
        t0 = time.perf_counter()
        runner.rollout(starts[0], INSTRUCTION, frames, steps, seed=seed)
        single_s.append(time.perf_counter() - t0)
        unet_ms.append(be.ms_per_call("unet"))
        be.reset_stats()
        t0 = time.perf_counter()
        batched = runner.predict(starts, INSTRUCTION, steps, seed=seed)  # (F, H, W, 3)
        batched_s.append(time.perf_counter() - t0)
        batched_unet_ms.append(be.ms_per_call("unet"))
    single, multi = statistics.median(single_s), statistics.median(batched_s)
    timings = {
        "ms_per_unet_step": round(statistics.median(unet_ms), 3),
        "ms_per_frame": round(1000 * single / frames, 2),
        "frames_per_s": round(frames / single, 3),
        "batched_frames_per_s": round(frames / multi, 3),
        "batched_ms_per_unet_step": round(statistics.median(batched_unet_ms), 3),
    }
    return timings, batched


def _to_unit(frames: np.ndarray) -> np.ndarray:
    return np.asarray(frames, np.float64) / 255.0


def _min_db(precision: str, seed_baseline: float | None) -> float:
    if precision == "int8":
        return INT8_GOOD_DB if seed_baseline is None else min(INT8_GOOD_DB, seed_baseline + INT8_MARGIN_DB)
    return PARITY_MIN_DB.get(precision, FRAME_PSNR_MIN_DB)


def _start_frames(resolution: int, frames: int) -> np.ndarray:
    return np.concatenate([parity_image(resolution, seed=k) for k in range(frames)])  # (F, H, W, 3) uint8


def _check_args(backends: Sequence[str], frames: int, steps: int, warmup: int, repeats: int) -> list[str]:
    backends = [b.strip() for b in backends if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise LftkError(f"unknown backend(s) {', '.join(unknown) or '(none given)'}: choose from {', '.join(BACKENDS)}")
    if not 1 <= frames <= MAX_FRAMES:
        raise LftkError(f"--frames must be 1..{MAX_FRAMES} (the batched rollout is one call; exports take {MAX_FRAMES} frames at most), got {frames}")
    if steps < 1 or repeats < 1 or warmup < 0:
        raise LftkError(f"steps and repeats must be >= 1 and warmup >= 0 (got steps={steps}, repeats={repeats}, warmup={warmup})")
    return list(dict.fromkeys(backends))


def run_bench(
    model: str | Path,
    backends: Sequence[str] = BACKENDS,
    frames: int = DEFAULT_FRAMES,
    steps: int = DEFAULT_STEPS,
    warmup: int = DEFAULT_WARMUP,
    repeats: int = DEFAULT_REPEATS,
    json_path: Path | None = None,
    log_path: Path | None = None,
    seed: int = 0,
    scheduler: str = "euler_a",
    threads: int | None = None,
    compile: bool = False,
    resolution: int | None = None,
) -> list[dict]:
    """One row per (backend, precision) of the export at MODEL; see the module docstring for the columns.

    `resolution`: frame size for a pipeline or run dir (default: the trained one, else the VAE's); an
    export runs at its manifest's and refuses another.

    `threads`: intra-op threads for torch and onnxruntime alike (default: each library's own choice).
    On a CPU shared with other work, torch's OpenMP threads wait on each other at every op; 1 thread
    can be many times faster there, so compare backends at the same count."""
    import torch

    backends = _check_args(backends, frames, steps, warmup, repeats)
    if threads is not None and threads < 1:
        raise LftkError(f"--threads must be >= 1, got {threads}")
    torch_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(
            model, backends, frames, steps, warmup, repeats, json_path, log_path, seed, scheduler, threads or 0, compile,
            resolution,
        )
    finally:
        torch.set_num_threads(torch_threads)


def _run(
    model, backends, frames, steps, warmup, repeats, json_path, log_path, seed, scheduler, threads, compile, resolution
) -> list[dict]:
    import torch

    ref = resolve_model(model)
    if ref.kind == "export":
        manifest = verify_manifest(ref.path)  # once: a tampered export is refused before anything runs
        if resolution is not None and int(resolution) != int(manifest["resolution"]):
            raise LftkError(
                f"--resolution {resolution}: the export at {ref.path} was built for {manifest['resolution']} px; leave "
                f"--resolution out, or time torch alone at {resolution} px with --model {ref.path / 'pipeline'}"
            )
        resolution = int(manifest["resolution"])
    else:  # torch rows only: the weights without an export
        manifest = None
        resolution = _pipeline_resolution(ref.pipeline_dir, resolution)
    starts = _start_frames(resolution, frames)
    settings = {"resolution": resolution, "frames": frames, "steps": steps, "warmup": warmup, "repeats": repeats,
                "seed": seed, "scheduler": scheduler,
                "threads": {"torch": torch.get_num_threads(), "onnxruntime": threads or "default"}}
    cases = sorted(_cases(manifest, backends, compile), key=lambda c: c != REFERENCE)  # the reference first
    want_baseline = any(p == "int8" for _, p in cases)
    reference, seed_baseline = None, None

    rows = []
    for backend, precision in cases:
        row = {"backend": backend, "precision": precision, "status": "ok", **dict.fromkeys(KEYS[3:])}
        row.update(size_mb=_size_mb(ref.path, manifest, ref.pipeline_dir, backend, precision), providers=None, **settings)
        try:
            on_cuda = _cuda_peak_reset()
            with _PeakRss() as rss:
                be = _open(ref.path, manifest, ref.pipeline_dir, backend, precision, threads, resolution)
                runner = Runner.from_backend(be, scheduler)
                timings, frames_out = _measure(runner, starts, frames, steps, warmup, repeats, seed)
            row.update(timings, peak_mem_mb=rss.mb, providers=be.providers)
            if on_cuda:
                row["peak_cuda_mem_mb"] = _cuda_peak_mb()
            if (backend, precision) == REFERENCE:
                reference, seed_baseline = _reference(runner, starts, steps, seed, want_baseline, frames_out)
            elif reference is None and "torch" not in backends and ref.pipeline_dir is not None:
                torch_runner = Runner.from_backend(TorchBackend(ref.pipeline_dir, resolution), scheduler)
                reference, seed_baseline = _reference(torch_runner, starts, steps, seed, want_baseline)
                torch_runner = None
            if (backend, precision) != REFERENCE and reference is not None:
                value = round(psnr_db(_to_unit(reference), _to_unit(frames_out)), 3)
                minimum = round(_min_db(precision, seed_baseline), 3)
                row.update(parity_psnr_db=value, parity_min_db=minimum)
                if value < minimum:
                    row["status"] = f"parity failed ({value:.1f} < {minimum:.1f} dB)"
            elif (backend, precision) != REFERENCE:
                row["status"] = "ok (parity not checked: no torch weights in the export)"
        except NotAvailableError as exc:
            row["status"] = f"not available: {exc}"
        except LftkError as exc:  # an engine built for another GPU or graph: refused, the other rows still run
            row["status"] = f"refused: {exc}"
        finally:
            be = runner = None
            gc.collect()
        log.info("bench %s %s: %s", backend, precision, row["status"])
        rows.append(row)

    if json_path is not None:
        json_path = Path(json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(rows, indent=2))
    if log_path is not None:
        append_log(Path(log_path), rows, ref.path)
    return rows


def _pipeline_resolution(pipeline_dir: Path, requested: int | None) -> int:
    """Frame size for a pipeline without an export: as asked, else the trained one, else the VAE's native."""
    from lftk.runtime.resolution import pick_resolution

    if requested is not None and (requested < 8 or requested % 8):
        raise LftkError(f"--resolution must be a positive multiple of 8 (SD 1.5's VAE downsamples by 8, lftk's small presets by 4), got {requested}")
    return pick_resolution(pipeline_dir, None, requested)


def _reference(runner: Runner, starts, steps, seed, want_baseline: bool, frames: np.ndarray | None = None):
    """torch fp32's batched frames, and (for int8 rows) the PSNR between two torch seeds: the scale
    int8's distance from fp32 is judged on, as the export's int8 gate does."""
    if frames is None:
        frames = runner.predict(starts, INSTRUCTION, steps, seed=seed)
    baseline = None
    if want_baseline:
        other = runner.predict(starts, INSTRUCTION, steps, seed=seed + 1)
        baseline = psnr_db(_to_unit(frames), _to_unit(other))
    return frames, baseline


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


def format_table(rows: list[dict]) -> str:
    """The rows as one plain-text table, with what each column measured underneath."""
    cells = [[h for h, _, _ in _COLUMNS]] + [[_cell(r, k, f) for _, k, f in _COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if rows:
        s = rows[0]
        n = s["frames"]
        lines += [
            "",
            f"{s['resolution']} px, {s['steps']} steps, {s['scheduler']}, seed {s['seed']}; medians of {s['repeats']} repeat(s) after {s['warmup']} warm-up; "
            f"threads: torch {s['threads']['torch']}, onnxruntime {s['threads']['onnxruntime']}.",
            f"ms/UNet step: one call, 1 frame x {CFG_BRANCHES} CFG branches. ms/frame, frames/s: a {n}-frame rollout "
            f"as {n} single-frame calls.",
            f"batched frames/s: {n} independent start frames in one Runner.predict call, one UNet call per step "
            f"(batch {CFG_BRANCHES * n}).",
            "peak RSS: the process during the row (includes libraries loaded before). PSNR: batched frames vs torch fp32.",
        ]
        for r in rows:
            if len(r["status"]) > _STATUS_WIDTH:
                lines.append(f"{r['backend']} {r['precision']}: {r['status']}")
    return "\n".join(lines)
