"""`lftk export`: the stages in order, driven by the export table.

    merge -> onnx fp32 (+ parity, manifest) -> fp16 / int8 variants -> --check-trt -> TensorRT engines

What the run knew comes from its saved metadata (final/lftk_model.json: base, LoRA settings,
resolution, horizon, prompt template; resolved_config.yaml: the training data that int8
calibrates on), so the command needs almost no flags. Every stage logs one line (time, artifact,
size, ok / FAILED and why); the run ends with the exact `lftk infer` and `lftk bench` commands.

MODEL may be a run, a pipeline dir, or an export dir. `--no-onnx` keeps an existing export's
fp32 graphs and adds to it (variants, a check, engines). Re-exporting graphs identical to the old
ones (same sha256) keeps the old variants and engines instead of rebuilding them.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import time
from pathlib import Path

from lftk import atomic
from lftk.errors import LftkError
from lftk.export import calibration, trt_check, variants
from lftk.runtime.contract import build_contracts, unet_branches
from lftk.runtime.manifest import (
    MANIFEST, PIPELINE_DIR, check_engines, graph_sha256, read_manifest, verify_manifest, write_manifest,
)
from lftk.export.merge import adapters_of, merge_run
from lftk.export.onnx_export import PARITY_FILE, export_onnx
from lftk.runtime.precision import Format, Precision, plan, targets_in
from lftk.export.stages import Report, stage
from lftk.model.base import load_pipeline, read_meta
from lftk.model.resolve import ModelRef, resolve_model

log = logging.getLogger("lftk.export")

RUN_META_KEYS = ("base", "trainable", "lora", "merged_lora", "resolution", "horizon", "horizons", "prompt_template", "preset")


def default_out(ref: ModelRef) -> Path:
    """An export dir adds to itself; a run or pipeline exports into <it>/export."""
    return ref.path if ref.kind == "export" else ref.path / "export"


def run_export(
    model: str | Path,
    out: str | Path | None = None,
    precision: str = "fp32",
    onnx: bool = True,
    trt: bool = False,
    dynamic_shape: bool = False,
    check_trt: bool = False,
    calib: str | Path | None = None,
    resolution: int | None = None,
    calib_pairs: int = calibration.CALIB_PAIRS,
    check_merge: bool = False,
) -> dict:
    """Run the export; returns a summary (out, manifest, stages, next commands). LftkError on bad
    input or a failed stage, NotAvailableError when --trt lacks a GPU or TensorRT. A LoRA run's
    final/ is exported as training wrote it (merged); `check_merge` rebuilds the merge from the base
    and the adapters and checks it against final/ first (needs the base)."""
    t_start = time.perf_counter()
    precision = Precision.parse(precision)
    targets = plan(precision, onnx, trt, dynamic_shape, calib is not None)
    if not targets and not check_trt:
        raise LftkError("nothing to do: --no-onnx without --trt, --check-trt or a --precision to add")
    if dynamic_shape and not onnx:
        raise LftkError("--dynamic-shape changes the exported graphs: drop --no-onnx to re-export them")
    info = None
    if any(t.build_on == "gpu" for t in targets):  # the table says what needs a GPU (TensorRT rows)
        from lftk.runtime.trt_engine import require_tensorrt

        info = require_tensorrt()  # before minutes of ONNX work, not after
    ref = resolve_model(model)
    out = Path(out) if out else default_out(ref)
    report = Report()
    old = _old_manifest(out) if onnx else None
    existing = None if onnx else _existing(out)
    pair_dir = None
    if any(_to_build(t, onnx, trt, existing) for t in targets if t.precision == Precision.INT8 and t.format == Format.ONNX):
        # Known before the fp32 export starts: a missing calibration source should cost seconds, not minutes.
        pair_dir = calibration.find_pair_dir(ref, Path(calib) if calib else None, _source_of(ref))

    final_out = out
    if onnx:  # built beside OUT and swapped in at the end: a killed export leaves the previous one whole
        out = atomic.staging_dir(final_out)
    try:
        if onnx:
            pipeline_dir = _merge(ref, out, report, check_merge)
            export_onnx(pipeline_dir, out, resolution, dynamic_shape=dynamic_shape, report=report,
                        source=Path(_source_of(ref) or ref.path), extra={"model": _model_meta(pipeline_dir)})
        elif not (out / MANIFEST).is_file():
            raise LftkError(f"--no-onnx adds to an existing export, and {out} has none: run `lftk export {model}` first")
        manifest = verify_manifest(out)
        _carry_over(manifest, old, final_out, out)

        derived = [t for t in targets if t.format == Format.ONNX and t.precision != Precision.FP32]
        pipe = contracts = None
        if derived or trt:
            pipe = load_pipeline(out / PIPELINE_DIR)
            contracts = build_contracts(pipe, int(manifest["resolution"]), bool(manifest.get("dynamic_shape")),
                                        unet_branches(read_meta(out / PIPELINE_DIR)))
        parity = json.loads((out / PARITY_FILE).read_text()) if (out / PARITY_FILE).is_file() else {}
        for row in derived:
            if not _to_build(row, onnx, trt, manifest):  # only a source of the engines: keep the graph already vetted
                with stage(report, row.precision.value, "graphs") as st:
                    st.skip(f"reusing the export's {row.precision.value} graph(s) for the engines")
                continue
            if row.precision == Precision.FP16:
                built, parity["fp16"] = variants.build_fp16(out, manifest, pipe, contracts, report)
            else:
                template = read_meta(out / PIPELINE_DIR).get("prompt_template", "{instruction}")
                built, parity["int8"] = variants.build_int8(out, manifest, pipe, contracts, pair_dir, template, report, calib_pairs)
                manifest["parity"]["int8_frame_psnr_db_vs_fp32"] = parity["int8"]["psnr_db_vs_fp32"]
            for name, var in built.items():
                manifest["components"][name].setdefault("variants", {})[row.precision.value] = var
            _save(out, manifest, parity)

        if check_trt or trt:
            with stage(report, "check", "tensorrt") as st:
                checked = trt_check.check_export(out, manifest)
                manifest["trt_check"] = {"source": checked["source"], "passed": checked["passed"],
                                         "graphs": len(checked["graphs"]), "failures": checked["failures"][:50]}
                _save(out, manifest, parity)
                st.done(note=trt_check.summary(checked))
                if check_trt:  # asked for: a refusal is the answer. With --trt alone TensorRT has the last word.
                    trt_check.raise_on_failure(checked)
                elif not checked["passed"]:
                    st.warn, st.note = True, st.note + "; building anyway, TensorRT decides"

        for row in (t for t in targets if t.format == Format.TRT):
            from lftk.export.tensorrt import build_engines, engine_parity

            record = build_engines(out, manifest, row, info, report)
            with stage(report, "parity", f"trt {row.precision.value}") as st:
                record["parity"] = engine_parity(pipe, out, manifest, record, row.precision.value, int(manifest["resolution"]))
                st.done(note=f"frame PSNR {record['parity']['frame_psnr_db_vs_ort']:.1f} dB vs onnxruntime "
                             f"(min {record['parity']['min_db']:.0f})")
                if not record["parity"]["passed"]:
                    raise LftkError(f"TensorRT {row.precision.value} engines disagree with onnxruntime: {record['parity']}")
            manifest.setdefault("engines", {})[row.precision.value] = record
            _save(out, manifest, parity)

        options = {"precision": precision.value, "dynamic_shape": dynamic_shape, "calib": str(calib) if calib else None, "trt": trt}
        if onnx:  # the command that made this export's graphs ...
            manifest["options"], manifest["additions"] = options, []
        elif targets:  # ... and what --no-onnx runs added to it since, for the rebuild hint
            manifest.setdefault("additions", [])
            if options not in manifest["additions"]:
                manifest["additions"].append(options)
        manifest["precisions"] = [t.key for t in targets_in(manifest)]
        staged = str(out)  # the staging dir's paths in the record are the export's own once swapped in
        manifest["stages"] = [{**st, "artifact": st["artifact"].replace(staged, str(final_out))}
                              if isinstance(st.get("artifact"), str) else st for st in report.as_list()]
        _save(out, manifest, parity)
    except BaseException:
        if onnx:
            shutil.rmtree(out, ignore_errors=True)
        raise
    if onnx:
        atomic.swap_in(out, final_out)
        out = final_out
    path = out / MANIFEST
    commands = next_commands(out, ref, manifest, calib)
    log.info("export done in %.1f s: %s (%s)", time.perf_counter() - t_start, out, ", ".join(manifest["precisions"]))
    return {"out": str(out), "manifest": str(path), "precisions": manifest["precisions"], "stages": manifest["stages"],
            "parity": manifest.get("parity", {}), "next": commands, "seconds": round(time.perf_counter() - t_start, 2)}


def _merge(ref: ModelRef, out: Path, report: Report, check: bool = False) -> Path:
    """The pipeline to export: MODEL's own pipeline (a run's final/ is merged when training ends;
    export copies it without its lora/ adapters), or with `check`, the run's adapters merged again
    into OUT/pipeline from the base and compared with final/."""
    if ref.pipeline_dir is None:
        raise LftkError(f"{ref.path}: export dir without its pipeline/ copy: export again from the source model")
    with stage(report, "merge", "lora") as st:
        if adapters_of(ref.pipeline_dir) is None:
            st.skip(f"already merged: {ref.pipeline_dir.name}/ holds no LoRA adapters")
            return ref.pipeline_dir
        if not check:
            st.skip(f"{ref.pipeline_dir.name}/ is merged as training wrote it; its lora/ adapters stay out of the "
                    "export (--check-merge rebuilds the merge from the base and compares)")
            return ref.pipeline_dir
        result = merge_run(ref.path, out / PIPELINE_DIR)
        st.done(result.pipeline_dir, f"base + lora/ == {ref.pipeline_dir.name}/ UNet (max abs diff {result.max_abs_diff:.1e})")
        return result.pipeline_dir


def _existing(out: Path) -> dict | None:
    try:
        return read_manifest(out) if (out / MANIFEST).is_file() else None
    except LftkError:
        return None


def _to_build(row, onnx: bool, trt: bool, manifest: dict | None) -> bool:
    """Whether a derived ONNX target is built now: always when asked for as ONNX; when it is only the
    source of --no-onnx --trt engines, only if the export lacks it."""
    if onnx or not trt or manifest is None:
        return True
    comps = manifest.get("components", {})
    return not all(row.precision.value in comp.get("variants", {}) for c, comp in comps.items() if row.covers(c))


def _source_of(ref: ModelRef) -> str | None:
    """The model an export dir given as MODEL was made from (its manifest's `source`)."""
    if ref.kind != "export":
        return None
    try:
        return read_manifest(ref.path).get("source")
    except LftkError:
        return None


def _model_meta(pipeline_dir: Path) -> dict:
    meta = read_meta(pipeline_dir)
    return {k: meta[k] for k in RUN_META_KEYS if k in meta}


def _old_manifest(out: Path) -> dict | None:
    try:
        return verify_manifest(out) if (out / MANIFEST).is_file() else None
    except LftkError as exc:  # a broken old export is replaced, not reused
        log.debug("old manifest of %s not reused: %s", out, exc)
        return None


def _carry_over(manifest: dict, old: dict | None, old_dir: Path, new_dir: Path) -> None:
    """Keep the old export's variants and engines that were built from graphs identical to the new ones
    (their files copied from `old_dir` into the new export being built in `new_dir`)."""
    if not old or old is manifest:
        return
    kept = []
    for name, comp in manifest.get("components", {}).items():
        prev = old.get("components", {}).get(name, {})
        if prev.get("files") and graph_sha256(prev["files"]) == graph_sha256(comp["files"]):
            for precision, var in prev.get("variants", {}).items():
                if var.get("source_sha256") == graph_sha256(comp["files"]):
                    comp.setdefault("variants", {}).setdefault(precision, var)
                    kept += var.get("files", [])
    for precision, eng in old.get("engines", {}).items():
        try:
            check_engines(Path("."), {**manifest, "engines": {precision: eng}}, precision, eng["tensorrt"], eng["compute_capability"])
        except LftkError:
            continue  # built from graphs that changed
        manifest.setdefault("engines", {}).setdefault(precision, eng)
        kept += [f for rec in eng.get("components", {}).values() for f in rec.get("files", [])]
    if Path(old_dir).resolve() != Path(new_dir).resolve():
        for rec in kept:
            (Path(new_dir) / rec["path"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(old_dir) / rec["path"], Path(new_dir) / rec["path"])


def _save(out: Path, manifest: dict, parity: dict) -> Path:
    (out / PARITY_FILE).write_text(json.dumps(parity, indent=2))
    return write_manifest(out, manifest)


def next_commands(out: Path, ref: ModelRef, manifest: dict, calib) -> list[str]:
    """The exact commands to run next, with a real frame and instruction when the training data is known."""
    image, instruction = "FRAME.jpg", "stack the blocks"
    try:
        pair_dir = calibration.find_pair_dir(ref, Path(calib) if calib else None, _source_of(ref))
        held = next((s for s in (*calibration.HELDOUT_SPLITS, "train") if (pair_dir / s).is_dir()), None)
        if held:
            from lftk.data.pairset import PairSet

            pairs = PairSet(pair_dir, held)
            if len(pairs):
                image, instruction = str(pairs[0].current), pairs[0].instruction
    except LftkError:
        pass  # no known training data: placeholders
    backends = "torch,ort" + (",trt" if manifest.get("engines") else "")
    q = shlex.quote
    return [
        f"lftk infer --model {q(str(out))} --image {q(image)} --instruction {q(instruction)} --backend ort",
        f"lftk bench --model {q(str(out))} --backends {backends}",
    ]
