"""Precision variants of an export's fp32 graphs: fp16 (all four components) and int8 (the UNet).

Each builder writes its graphs next to the fp32 ones (`<name><suffix>` from the export table),
logs a stage line per artifact and a parity line, and returns what the manifest records: per
component `variants.<precision>` = files + the hash of the fp32 graph it came from (so a later
export with identical fp32 graphs can keep it), and a parity record for parity.json.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lftk.errors import LftkError
from lftk.export import calibration, fp16, quantize
from lftk.runtime.layout import ONNX_DIR, PIPELINE_DIR
from lftk.runtime.manifest import file_record, graph_sha256
from lftk.runtime.ort_graph import OrtGraph
from lftk.export.parity import ComponentNetworks, open_graphs, parity_image, sample_frame
from lftk.eval.metrics import psnr_db
from lftk.runtime.precision import Format, Precision, target
from lftk.export.stages import Report, human_size, stage
from lftk.model.base import read_meta
from lftk.runtime.params import SamplingParams

log = logging.getLogger(__name__)

FP16_PSNR_WARN_DB = 30.0
FP16_FRAME_STEPS = 4


def _variant(out: Path, files: list[Path], source: list[dict], **info) -> dict:
    return {
        "files": [file_record(out, Path(f).relative_to(out).as_posix()) for f in files],
        "source_sha256": graph_sha256(source),
        **info,
    }


def build_fp16(out: Path, manifest: dict, pipe, contracts: dict, report: Report) -> tuple[dict, dict]:
    """fp16 graphs of all components; ({component: variant record}, parity record)."""
    row = target(Format.ONNX, Precision.FP16)
    variants = {}
    for name, comp in manifest["components"].items():
        src = out / comp["files"][0]["path"]
        dest = src.with_name(row.filename(name))
        with stage(report, "fp16", name) as st:
            # The UNet's timestep path stays fp32 (see fp16.py).
            keep = ("timestep",) if name == "unet" else ()
            files = fp16.convert_graph(src, dest, keep_fp32_inputs=keep)
            st.done(files, "checker ok; for GPU providers")
        variants[name] = _variant(out, files, comp["files"], precision="fp16", io_dtype="float32")
    with stage(report, "parity", "fp16") as st:
        parity = _fp16_parity(out, manifest, variants, pipe, contracts)
        if parity.get("psnr_db_vs_fp32") is None:
            st.skip(parity["status"])
        else:
            st.done(note=f"frame PSNR {parity['psnr_db_vs_fp32']:.1f} dB vs fp32 on {parity['providers'][0]} "
                         "(fp16 targets GPU providers)")
            st.warn = parity["psnr_db_vs_fp32"] < FP16_PSNR_WARN_DB
    return variants, parity


def _fp16_parity(out: Path, manifest: dict, variants: dict, pipe, contracts: dict) -> dict:
    """Frame PSNR fp16 vs fp32 graphs, if this onnxruntime can run fp16 graphs at all; never invented."""
    try:
        half = {
            name: OrtGraph(out / variants[name]["files"][0]["path"], c.input_dtypes(), c.output_names()[0])
            for name, c in contracts.items()
        }
    except Exception as exc:  # a provider without fp16 kernels fails at session creation
        return {"psnr_db_vs_fp32": None, "status": f"not run: this onnxruntime cannot load the fp16 graphs ({exc})"}
    full = open_graphs(contracts, out / ONNX_DIR)
    res = int(manifest["resolution"])
    image, prompt = parity_image(res), "move the red block onto the blue block"
    try:
        ref = sample_frame(pipe, ComponentNetworks(full), image, prompt, FP16_FRAME_STEPS, 0)
        got = sample_frame(pipe, ComponentNetworks(half), image, prompt, FP16_FRAME_STEPS, 0)
    except Exception as exc:  # e.g. an fp16 kernel missing at run time on this provider
        return {"psnr_db_vs_fp32": None, "status": f"not run: {exc}"}
    return {
        "psnr_db_vs_fp32": round(psnr_db(ref, got), 3),
        "providers": half["unet"].providers,
        "steps": FP16_FRAME_STEPS,
        "note": "measured on the provider named; fp16 graphs are meant for GPU providers",
    }


def build_int8(
    out: Path,
    manifest: dict,
    pipe,
    contracts: dict,
    pair_dir: Path,
    template: str,
    report: Report,
    calib_pairs: int = calibration.CALIB_PAIRS,
    calib_steps: int = calibration.CALIB_STEPS,
) -> tuple[dict, dict]:
    """Q/DQ int8 UNet calibrated on `pair_dir`; ({"unet": variant record}, parity record)."""
    row = target(Format.ONNX, Precision.INT8)
    res = int(manifest["resolution"])
    with stage(report, "calib", "unet") as st:
        sampling = SamplingParams.for_model(read_meta(out / PIPELINE_DIR))  # the CFG branches the runner will feed
        calib = calibration.gather(pipe, contracts, pair_dir, res, template, calib_pairs, calib_steps, sampling=sampling)
        st.done(note=f"{len(calib.feeds)} UNet batches from {len(calib.pairs)} {calib.split} pairs of {pair_dir}")
    variants = {}
    for name in (c for c in manifest["components"] if row.covers(c)):
        comp = manifest["components"][name]
        src = out / comp["files"][0]["path"]
        with stage(report, "int8", name) as st:
            files = quantize.quantize_graph(src, src.with_name(row.filename(name)), calib.feeds)
            counts = quantize.qdq_counts(files[0])
            st.done(files, f"{counts['QuantizeLinear']} Q / {counts['DequantizeLinear']} DQ nodes, checker ok")
        variants[name] = _variant(
            out, files, comp["files"], precision="int8",
            quantization={"format": "QDQ", "activations": "int8 symmetric per-tensor", "weights": "int8 symmetric per-channel",
                          "ops": list(quantize.QUANTIZED_OPS), "method": "MinMax", **counts},
            calibration=calib.describe(),
        )
    with stage(report, "parity", "int8") as st:
        fp32_graphs = open_graphs(contracts, out / ONNX_DIR)
        unet = contracts["unet"]
        int8_unet = OrtGraph(out / variants["unet"]["files"][0]["path"], unet.input_dtypes(), unet.output_names()[0])
        parity = quantize.int8_frame_psnr(pipe, contracts, fp32_graphs, int8_unet, calib, res)
        fp32_bytes = sum(r["bytes"] for r in manifest["components"]["unet"]["files"])
        int8_bytes = sum(r["bytes"] for r in variants["unet"]["files"])
        parity.update(unet_bytes=int8_bytes, unet_fp32_bytes=fp32_bytes, size_ratio=round(int8_bytes / fp32_bytes, 3))
        st.done(note=f"frame PSNR {parity['psnr_db_vs_fp32']:.1f} dB vs fp32 (min {parity['min_db']:.1f}; another seed: "
                     f"{parity['seed_baseline_db']:.1f}) on {parity['frame']}; UNet {human_size(int8_bytes)} vs "
                     f"{human_size(fp32_bytes)} fp32")
        if not parity["passed"]:
            raise LftkError(
                f"int8 frame PSNR {parity['psnr_db_vs_fp32']:.1f} dB against fp32 is below {parity['min_db']:.1f} dB "
                f"(another seed alone gives {parity['seed_baseline_db']:.1f} dB): calibrate on more or more typical "
                "pairs (--calib), or export fp16"
            )
    return variants, parity
