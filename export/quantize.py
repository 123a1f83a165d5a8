"""int8 by explicit quantization: a Q/DQ UNet graph from the fp32 one, and what it costs in quality.

onnxruntime's static quantizer inserts QuantizeLinear/DequantizeLinear pairs around the ops that
carry the UNet's compute (Conv, MatMul, Gemm), with ranges from calibration data (`calibration`).
The settings are the ones TensorRT's explicit quantization takes (onnx-tensorrt's operator list,
enforced by `--check-trt`): signed int8, symmetric (zero points 0) for activations and weights,
per-channel weight scales, and biases left in float (the list takes no INT32 DequantizeLinear).
Kept in float: the timestep-embedding path (tiny, and timesteps need the range) and the first and
last convolutions (they touch the latents directly; the usual practice for diffusion UNets).

The same graph runs in onnxruntime on CPU, which is how its quality is measured here: a full frame
sampled with the int8 UNet against the same frame with the fp32 UNet (same seed, ORT both sides).
The figure is judged against what the sampler's own randomness does: the PSNR between two fp32
frames that differ only in seed. int8 passes when it is at least INT8_MARGIN_DB closer to fp32 than
that, or above INT8_PSNR_GOOD_DB outright.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from lftk.errors import LftkError
from lftk.export.calibration import Calibration
from lftk.runtime.contract import ComponentContract
from lftk.runtime.ort_graph import OrtGraph
from lftk.export.parity import ComponentNetworks, parity_image, sample_frame
from lftk.eval.metrics import psnr_db

log = logging.getLogger(__name__)

QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")  # where the UNet's FLOPs are; the rest stays float
INT8_PSNR_GOOD_DB = 30.0  # int8 passes at or above this PSNR against fp32 ...
INT8_MARGIN_DB = 3.0  # ... or when this much closer to fp32 than a change of seed is
INT8_FRAME_STEPS = 10
_EXTERNAL_DATA_BYTES = 2_000_000_000  # protobuf's 2 GB limit, with margin


class _Reader(CalibrationDataReader):
    """Recorded UNet feeds, one call at a time, as onnxruntime's calibrator reads them."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = feeds
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.feeds)


def kept_in_float(src: Path) -> list[str]:
    """Nodes left unquantized: the timestep path and the first and last Conv of the graph."""
    import onnx

    from lftk.export.fp16 import nodes_fed_only_by

    graph = onnx.load(str(src), load_external_data=False).graph
    convs = [n.name for n in graph.node if n.op_type == "Conv"]
    return nodes_fed_only_by(graph, {"timestep"}) + (convs[:1] + convs[-1:] if convs else [])


def quantize_graph(src: Path, dest: Path, feeds: list[dict[str, np.ndarray]]) -> list[Path]:
    """Write the Q/DQ int8 version of the graph at `src` to `dest` (plus dest.data past 2 GB)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not feeds:
        raise LftkError("int8: no calibration data recorded")
    exclude = kept_in_float(src)
    reader = _Reader(feeds)
    external = src.with_name(src.name + ".data").exists() or src.stat().st_size > _EXTERNAL_DATA_BYTES
    for stale in (dest, dest.with_name(dest.name + ".data")):
        stale.unlink(missing_ok=True)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer warns through the root logger about optional pre-processing
    try:
        quantize_static(
            str(src),
            str(dest),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=True,
            nodes_to_exclude=exclude,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=external,
            extra_options={
                "ActivationSymmetric": True,  # TensorRT: zero points must be 0
                "WeightSymmetric": True,
                "QuantizeBias": False,  # TensorRT's DequantizeLinear takes INT8/FP8/INT4, not INT32 biases
            },
        )
    except Exception as exc:  # the quantizer raises many kinds; the user needs the graph and the reason
        raise LftkError(f"int8 quantization of {src} failed: {exc}") from exc
    finally:
        root.setLevel(level)
    files = [dest]
    data = dest.with_name(dest.name + ".data")
    if external:
        _gather_external(dest)
        files.append(data)
    import onnx

    onnx.checker.check_model(str(dest))
    return files


def _gather_external(dest: Path) -> None:
    """The quantizer names its external file after the graph; make it <graph>.data like the fp32 export."""
    import onnx

    model = onnx.load(str(dest), load_external_data=True)
    for p in dest.parent.glob(f"{dest.stem}*"):
        if p != dest and p.suffix != ".onnx":
            p.unlink()
    onnx.save_model(model, str(dest), save_as_external_data=True, all_tensors_to_one_file=True, location=dest.name + ".data")


def qdq_counts(path: Path) -> dict:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts = Counter(n.op_type for n in model.graph.node)
    return {"QuantizeLinear": counts["QuantizeLinear"], "DequantizeLinear": counts["DequantizeLinear"]}


def int8_frame_psnr(
    pipe,
    contracts: dict[str, ComponentContract],
    fp32_graphs: dict[str, OrtGraph],
    int8_unet: OrtGraph,
    calib: Calibration,
    resolution: int,
    steps: int = INT8_FRAME_STEPS,
    seed: int = 0,
) -> dict:
    """PSNR of one frame sampled with the int8 UNet against the fp32 UNet, both in onnxruntime, beside
    the PSNR of two fp32 frames one seed apart (the scale the first figure is judged on)."""
    if calib.heldout is not None:
        image, prompt, name = calib.heldout
    else:
        image, prompt, name = parity_image(resolution, seed), "move the red block onto the blue block", "parity image"
    nets_int8 = ComponentNetworks({**fp32_graphs, "unet": int8_unet})
    t0 = time.perf_counter()
    nets_fp32 = ComponentNetworks(fp32_graphs)
    ref = sample_frame(pipe, nets_fp32, image, prompt, steps, seed)
    got = sample_frame(pipe, nets_int8, image, prompt, steps, seed)
    other_seed = sample_frame(pipe, nets_fp32, image, prompt, steps, seed + 1)
    value, baseline = round(psnr_db(ref, got), 3), round(psnr_db(ref, other_seed), 3)
    minimum = round(min(INT8_PSNR_GOOD_DB, baseline + INT8_MARGIN_DB), 3)
    return {
        "psnr_db_vs_fp32": value,
        "seed_baseline_db": baseline,  # fp32 seed s vs fp32 seed s+1
        "min_db": minimum,
        "passed": value >= minimum,
        "frame": name,
        "steps": steps,
        "seed": seed,
        "providers": int8_unet.providers,
        "seconds": round(time.perf_counter() - t0, 3),
    }
