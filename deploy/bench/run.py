"""`run_bench`: one row per (backend, precision) of a model, each timed and checked the same way."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from lftk.deploy.bench import cases as bench_cases
from lftk.deploy.bench import memory
from lftk.deploy.bench.peer import PipelineRunner
from lftk.deploy.bench.reference import judge, reference
from lftk.deploy.bench.report import append_log
from lftk.deploy.bench.timing import INSTRUCTION, measure, start_frames
from lftk.errors import LftkError, NotAvailableError
from lftk.model.resolve import resolve_model
from lftk.model.base import read_meta
from lftk.runtime.contract import CFG_BRANCHES
from lftk.runtime.manifest import verify_manifest
from lftk.runtime.params import SamplingParams
from lftk.runtime.sampler import uses_cfg
from lftk.runtime.runner import Runner

log = logging.getLogger(__name__)

DEFAULT_FRAMES = 15
DEFAULT_STEPS = 4  # per-step and per-frame figures scale with steps; few keep a tiny-model CPU run near a minute
DEFAULT_WARMUP = 1
DEFAULT_REPEATS = 2
KEYS = (
    "backend", "precision", "status", "ms_per_unet_step", "ms_per_frame", "frames_per_s",
    "batched_frames_per_s", "peak_mem_mb", "parity_psnr_db",
)  # what --json promises; rows carry a few more (size_mb, providers, settings)


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """How every row of one bench run is timed; `row_fields` is what each row records of it."""

    resolution: int
    frames: int = DEFAULT_FRAMES
    steps: int = DEFAULT_STEPS
    warmup: int = DEFAULT_WARMUP
    repeats: int = DEFAULT_REPEATS
    seed: int = 0
    scheduler: str = "euler_a"
    threads: int = 0  # onnxruntime's intra-op threads (0: its own choice); torch's are set by run_bench
    branches: int = CFG_BRANCHES  # UNet rows per frame at the guidance run (1: no guidance branches)
    guidance: float | None = None  # text / image guidance scales; None: the model's own
    image_guidance: float | None = None

    def sampled(self, runner):
        """`runner` with these guidance scales as its defaults (what every timed call then runs)."""
        runner.sampling = runner.sampling.overridden(guidance=self.guidance, image_guidance=self.image_guidance)
        return runner

    def row_fields(self) -> dict:
        import torch

        fields = {k: getattr(self, k) for k in ("resolution", "frames", "steps", "warmup", "repeats", "seed", "scheduler",
                                                "branches", "guidance", "image_guidance")}
        fields["threads"] = {"torch": torch.get_num_threads(), "onnxruntime": self.threads or "default"}
        return fields


def run_bench(
    model: str | Path,
    backends: Sequence[str] = bench_cases.BENCH_BACKENDS,
    frames: int = DEFAULT_FRAMES,
    steps: int | Sequence[int] = DEFAULT_STEPS,
    warmup: int = DEFAULT_WARMUP,
    repeats: int = DEFAULT_REPEATS,
    json_path: Path | None = None,
    log_path: Path | None = None,
    seed: int = 0,
    scheduler: str | None = None,
    threads: int | None = None,
    guidance: float | None = None,
    image_guidance: float | None = None,
    compile: bool = False,
    resolution: int | None = None,
) -> list[dict]:
    """One row per (backend, precision) of the model at MODEL; `lftk.deploy.bench` lists the columns.

    `guidance`, `image_guidance`: the scales every row samples with (default: the model's own).
    `steps`: one count, or several (a row per backend, precision and count: the speed/steps trade-off
    of a distilled student). `scheduler` None: the model's (lcm for a distilled student, else euler_a).

    `resolution`: frame size for a pipeline or run dir (default: the trained one, else the VAE's); an
    export runs at its manifest's and refuses another.

    `threads`: intra-op threads for torch and onnxruntime alike (default: each library's own choice).
    On a CPU shared with other work, torch's OpenMP threads wait on each other at every op; 1 thread
    can be many times faster there, so compare backends at the same count."""
    import torch

    counts = [steps] if isinstance(steps, int) else list(dict.fromkeys(steps))
    if not counts:
        raise LftkError("--steps: give at least one step count")
    for count in counts:
        backends = bench_cases.check_args(backends, frames, count, warmup, repeats)
    if threads is not None and threads < 1:
        raise LftkError(f"--threads must be >= 1, got {threads}")
    ref = resolve_model(model)
    manifest, resolution = _model_resolution(ref, resolution)
    params = SamplingParams.for_model(read_meta(ref.pipeline_dir) if ref.pipeline_dir is not None else {},
                                      guidance=guidance, image_guidance=image_guidance)
    branches = CFG_BRANCHES if uses_cfg(params.guidance, params.image_guidance) else 1
    torch_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        rows = []
        for count in counts:
            settings = BenchSettings(resolution, frames, count, warmup, repeats, seed, scheduler or params.scheduler,
                                     threads or 0, branches, params.guidance, params.image_guidance)
            rows += _rows(ref, manifest, backends, settings, compile)
    finally:
        torch.set_num_threads(torch_threads)
    if json_path is not None:
        json_path = Path(json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(rows, indent=2))
    if log_path is not None:
        append_log(Path(log_path), rows, ref.path)
    return rows


def _model_resolution(ref, requested: int | None) -> tuple[dict | None, int]:
    """The export's verified manifest (None for a pipeline or run dir) and the frame size to bench at."""
    from lftk.runtime.resolution import pick_resolution

    if ref.kind != "export":  # torch rows only: the weights without an export
        if requested is not None and (requested < 8 or requested % 8):
            raise LftkError(
                f"--resolution must be a positive multiple of 8 (SD 1.5's VAE downsamples by 8, lftk's small "
                f"presets by 4), got {requested}"
            )
        return None, pick_resolution(ref.pipeline_dir, None, requested)
    manifest = verify_manifest(ref.path)  # once: a tampered export is refused before anything runs
    if requested is not None and int(requested) != int(manifest["resolution"]):
        raise LftkError(
            f"--resolution {requested}: the export at {ref.path} was built for {manifest['resolution']} px; leave "
            f"--resolution out, or time torch alone at {requested} px with --model {ref.path / 'pipeline'}"
        )
    return manifest, int(manifest["resolution"])


def _rows(ref, manifest: dict | None, backends: list[str], s: BenchSettings, compile: bool) -> list[dict]:
    starts = start_frames(s.resolution, s.frames)
    row_cases = bench_cases.cases(manifest, backends, compile)
    want_baseline = any(p == "int8" for _, p in row_cases)
    want_raw = any(b == bench_cases.PEER for b, _ in row_cases)
    refs: dict | None = None  # torch fp32's frames (with the model's keep rules, and without), seed baseline
    rows = []
    for backend, precision in row_cases:
        row = {"backend": backend, "precision": precision, "status": "ok", **dict.fromkeys(KEYS[3:])}
        row.update(size_mb=bench_cases.size_mb(ref.path, manifest, ref.pipeline_dir, backend, precision), providers=None)
        row.update(s.row_fields())
        runner = None
        try:
            runner, frames = _time_row(row, ref, manifest, s, starts)
            if (backend, precision) == bench_cases.REFERENCE:
                refs = _references(runner, starts, s, want_baseline, want_raw, frames)
                continue
            runner = None  # free this row's backend before a torch reference loads beside it
            if refs is None and "torch" not in backends and ref.pipeline_dir is not None:
                torch_be = bench_cases.open_case(ref.path, manifest, *bench_cases.REFERENCE, s.threads, s.resolution)
                refs = _references(s.sampled(Runner.from_backend(torch_be, s.scheduler)), starts, s, want_baseline, want_raw)
                torch_be = None
            if refs is not None:
                # the stock pipeline has no keep rules: it is compared with lftk's frames made without them
                judge(row, refs["raw" if backend == bench_cases.PEER else "frames"], frames, refs["baseline"])
            else:
                row["status"] = "ok (parity not checked: no torch weights in the export)"
        except NotAvailableError as exc:
            row["status"] = f"not available: {exc}"
        except LftkError as exc:  # an engine built for another GPU or graph: refused, the other rows still run
            row["status"] = f"refused: {exc}"
        finally:
            runner = None
            gc.collect()
            log.info("bench %s %s: %s", backend, precision, row["status"])
            rows.append(row)
    _speedups(rows)
    return rows


def _references(runner: Runner, starts, s: BenchSettings, want_baseline: bool, want_raw: bool, frames=None) -> dict:
    frames, baseline = reference(runner, starts, s.steps, s.seed, want_baseline, frames)
    raw = frames
    if want_raw and (runner.sampling.keep > 0 or runner.sampling.keep_objects):
        raw = runner.predict(starts, INSTRUCTION, s.steps, seed=s.seed, keep=0, keep_objects=False)
    return {"frames": frames, "baseline": baseline, "raw": raw}


def _speedups(rows: list[dict]) -> None:
    """`vs_diffusers` per timed row: the stock pipeline's ms/frame over the row's (its own precision's
    diffusers row, else fp32's); > 1 is faster than the pipeline."""
    peer = {r["precision"]: r["ms_per_frame"] for r in rows if r["backend"] == bench_cases.PEER and r["ms_per_frame"]}
    for r in rows:
        base = peer.get(r["precision"], peer.get("fp32"))
        r["vs_diffusers"] = round(base / r["ms_per_frame"], 2) if base and r["ms_per_frame"] else None


def _time_row(row: dict, ref, manifest: dict | None, s: BenchSettings, starts: np.ndarray) -> tuple[Runner, np.ndarray]:
    """Open the row's backend, time it, record timings and memory in `row`; its runner and batched frames back."""
    on_cuda = memory.cuda_peak_reset()
    with memory.PeakRss() as rss:
        if row["backend"] == bench_cases.PEER:
            if ref.pipeline_dir is None:
                raise NotAvailableError("the export has no pipeline/ copy (the diffusers pipeline needs its weights)")
            runner = s.sampled(PipelineRunner(ref.pipeline_dir, row["precision"], s.resolution, s.scheduler))
        else:
            be = bench_cases.open_case(ref.path, manifest, row["backend"], row["precision"], s.threads, s.resolution)
            runner = s.sampled(Runner.from_backend(be, s.scheduler))
        be = runner.backend
        timings, frames = measure(runner, starts, s.steps, s.warmup, s.repeats, s.seed)
    row.update(timings, peak_mem_mb=rss.mb, providers=be.providers)
    if on_cuda:
        row["peak_cuda_mem_mb"] = memory.cuda_peak_mb()
    return runner, frames
