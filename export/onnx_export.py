"""`lftk export MODEL --onnx`: four ONNX graphs, checked, parity-tested, hashed into a manifest.

Export dir layout:
    OUT/onnx/{text_encoder,vae_encoder,unet,vae_decoder}.onnx   (+ <name>.onnx.data past 2 GB)
    OUT/onnx/<name>.fp16.onnx, unet.int8.onnx   precision variants (`lftk.export.run`)
    OUT/trt/<name>.<precision>.engine           TensorRT engines (`lftk.export.tensorrt`)
    OUT/pipeline/       the source diffusers dir (tokenizer, scheduler config, lftk_model.json,
                        weights): the torch backend and a re-export start from it
    OUT/parity.json     ORT vs torch figures
    OUT/manifest.json   written last, and only when parity passed: a failed or interrupted export
                        is never picked up by a backend
Uses the legacy TorchScript exporter (opset 17, ~3 s for the tiny graphs on CPU): the dynamo
exporter needs opset >= 18 (at 17 it writes a Split that onnxruntime rejects) and takes ~15x longer.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

from lftk.errors import LftkError
from lftk.runtime.layout import LORA_DIR
from lftk.runtime.resolution import pick_resolution
from lftk.runtime.contract import ComponentContract, build_contracts, unet_branches
from lftk.runtime.manifest import MANIFEST, ONNX_DIR, PIPELINE_DIR, file_record, pipeline_records, tool_versions, write_manifest
from lftk.export.parity import check_parity, raise_on_failure
from lftk.export.stages import Report, stage
from lftk.model.base import load_pipeline, read_meta, write_meta
from lftk.model.resolve import resolve_model

log = logging.getLogger(__name__)

PARITY_FILE = "parity.json"


def _place(tmp_file: Path, dest: Path) -> list[Path]:
    """Move an exported graph into place; gather tensors the exporter spilled (> 2 GB) into one file."""
    import onnx

    for stale in (dest, dest.with_name(dest.name + ".data")):
        stale.unlink(missing_ok=True)
    if [p for p in tmp_file.parent.iterdir() if p != tmp_file]:
        # Past protobuf's 2 GB limit the exporter writes one file per tensor; one .data file is tidier to ship.
        model = onnx.load(str(tmp_file), load_external_data=True)
        data = dest.name + ".data"
        onnx.save_model(model, str(dest), save_as_external_data=True, all_tensors_to_one_file=True, location=data)
        return [dest, dest.with_name(data)]
    shutil.move(str(tmp_file), dest)
    return [dest]


def export_component(contract: ComponentContract, pipe, onnx_dir: Path, opset: int) -> list[Path]:
    """Export one network per its contract and run onnx.checker on the result."""
    import onnx

    module = contract.module(pipe)
    inputs = contract.sample_inputs()
    with tempfile.TemporaryDirectory(dir=onnx_dir, prefix=f".{contract.name}-") as tmp:
        tmp_file = Path(tmp) / contract.filename
        try:
            with warnings.catch_warnings(), torch.no_grad():
                # The legacy exporter warns about its own deprecation and every traced Python branch
                # (TracerWarning); none of it is actionable for a user, failures still raise.
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module,
                    inputs,
                    str(tmp_file),
                    input_names=contract.input_names(),
                    output_names=contract.output_names(),
                    dynamic_axes=contract.dynamic_axes(),
                    opset_version=opset,
                    do_constant_folding=True,
                    dynamo=False,
                )
        except Exception as exc:  # the exporter raises many types; the user needs the component and opset
            raise LftkError(f"ONNX export of {contract.name} failed at opset {opset}: {exc}") from exc
        files = _place(tmp_file, onnx_dir / contract.filename)
        for f in files[1:]:
            f.chmod(files[0].stat().st_mode & 0o777)  # onnx writes external data 0600; it ships like the graph
    # A path (not a loaded proto) so the checker also handles graphs with external data.
    onnx.checker.check_model(str(files[0]))
    return files


def _copy_pipeline(pipeline_dir: Path, dest: Path) -> None:
    if dest.resolve() == pipeline_dir.resolve():
        return  # re-exporting from the export's own copy: it is already in place
    if dest.exists():
        shutil.rmtree(dest)
    # A run's final/ carries its LoRA adapters beside the merged weights: the export is a plain pipeline.
    shutil.copytree(pipeline_dir, dest, ignore=lambda d, names: [LORA_DIR] if Path(d) == Path(pipeline_dir) else [])


def export_onnx(
    model_dir: Path,
    out: Path,
    resolution: int | None = None,
    opset: int = 17,
    dynamic_shape: bool = False,
    report: Report | None = None,
    source: Path | None = None,
    extra: dict | None = None,
    pipe=None,
) -> dict:
    """Export MODEL (run, pipeline or export dir) to OUT as fp32 graphs; returns a summary.

    Each stage logs one line (`stages`). `source` is what the manifest names as the origin (the
    run, when MODEL is the pipeline a merge just wrote); `extra` adds manifest fields; `pipe` is
    MODEL's pipeline when the caller has it loaded already.
    """
    t_start = time.perf_counter()
    report = report if report is not None else Report()
    ref = resolve_model(model_dir)
    if ref.pipeline_dir is None:
        raise LftkError(f"{model_dir}: export dir without its pipeline/ copy: export again from the source model")
    pipeline_dir = ref.pipeline_dir
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Drop the old manifest first: until the new one is written, OUT is not a usable export.
    (out / MANIFEST).unlink(missing_ok=True)
    onnx_dir = out / ONNX_DIR
    onnx_dir.mkdir(exist_ok=True)

    with stage(report, "load", "pipeline") as st:
        pipe = pipe if pipe is not None else load_pipeline(pipeline_dir)
        res = pick_resolution(pipeline_dir, pipe, resolution)
        contracts = build_contracts(pipe, res, dynamic_hw=dynamic_shape, branches=unet_branches(read_meta(pipeline_dir)))
        st.done(pipeline_dir, f"{res} px" + (", dynamic H/W" if dynamic_shape else ""))

    components = {}
    for name, contract in contracts.items():
        with stage(report, "onnx", name) as st:
            files = export_component(contract, pipe, onnx_dir, opset)
            st.done(files, "checker ok" + (", external data" if len(files) > 1 else ""))
        components[name] = {
            "files": [file_record(out, f.relative_to(out).as_posix()) for f in files],
            **contract.describe(),
        }

    with stage(report, "copy", "pipeline") as st:
        _copy_pipeline(pipeline_dir, out / PIPELINE_DIR)
        write_meta(out / PIPELINE_DIR, {"resolution": res})  # so the torch backend of this export runs at it too
        st.done(out / PIPELINE_DIR)

    with stage(report, "parity", "fp32") as st:
        parity = check_parity(pipe, contracts, onnx_dir, res)
        (out / PARITY_FILE).write_text(json.dumps(parity, indent=2))
        worst = max(r["max_abs_diff"] for r in parity["components"].values())
        st.done(out / PARITY_FILE, f"ORT vs torch: frame PSNR {parity['frame']['psnr_db']:.1f} dB, max abs diff {worst:.1e}")
        raise_on_failure(parity, out / PARITY_FILE)

    manifest = {
        "source": str(Path(source or model_dir).resolve()),
        "pipeline": PIPELINE_DIR,
        "resolution": res,
        "latent_resolution": next(iter(contracts.values())).dims.latent,
        "dynamic_shape": dynamic_shape,
        "scaling_factor": float(pipe.vae.config.scaling_factor),
        "precision": "fp32",  # of components.*.files; other precisions are variants and engines
        "opset": opset,
        "exporter": "torch.onnx (TorchScript, dynamo=False)",
        "versions": tool_versions(),
        "components": components,
        "pipeline_files": pipeline_records(out),
        "parity": {
            "frame_psnr_db": parity["frame"]["psnr_db"],
            **{f"{n}_max_abs_diff": r["max_abs_diff"] for n, r in parity["components"].items()},
        },
        **(extra or {}),
    }
    path = write_manifest(out, manifest)
    seconds = time.perf_counter() - t_start
    log.debug("manifest %s; ONNX export done in %.1f s", path, seconds)
    return {
        "out": str(out),
        "manifest": str(path),
        "files": {n: [r["path"] for r in c["files"]] for n, c in components.items()},
        "resolution": res,
        "seconds": round(seconds, 2),
        "parity": manifest["parity"],
    }
