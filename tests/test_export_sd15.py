"""The full-size SD 1.5 UNet (InstructPix2Pix's 8 input channels, random weights) past ONNX's 2 GB limit:
exported with external data, checked, run one step in onnxruntime, vetted by --check-trt's rules.

Slow tier (`pytest -m slow`): ~4-6 min and ~8 GB peak RSS on a 2-core CPU box. The latent is 32x32
(256 px frames) to keep the CPU step short; the graph and its 3.4 GB of weights do not depend on it.
"""

from __future__ import annotations

import gc
import logging
import resource
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

log = logging.getLogger(__name__)

MEMORY_LIMIT_GIB = 24
PROTOBUF_LIMIT = 2 * 1024**3


@pytest.mark.slow
def test_sd15_unet_exports_with_external_data_and_runs_in_onnxruntime(tmp_path):
    import onnxruntime as ort
    from diffusers import UNet2DConditionModel

    from lftk.runtime.contract import ModelDims, UnetContract
    from lftk.export.onnx_export import export_component
    from lftk.export.trt_check import check_graph
    from lftk.model.components import preset_spec

    t0 = time.perf_counter()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**preset_spec("sd15").unet).eval()
    assert sum(p.numel() for p in unet.parameters()) > 850e6
    contract = UnetContract(ModelDims(resolution=256, latent=32, text_dim=768, vocab_size=49408, vae_scale=8, multiple=64))
    inputs = contract.sample_inputs()  # batch 3: the CFG branches of one frame
    with torch.inference_mode():
        expected = contract.module(SimpleNamespace(unet=unet))(*inputs).numpy()

    files = export_component(contract, SimpleNamespace(unet=unet), tmp_path, opset=17)  # checker runs inside
    t_export = time.perf_counter() - t0
    assert [f.name for f in files] == ["unet.onnx", "unet.onnx.data"]
    assert files[0].stat().st_size < PROTOBUF_LIMIT < files[1].stat().st_size
    del unet
    gc.collect()

    report = check_graph(files[0], contract.describe())
    assert report["failures"] == [] and report["untyped_nodes"] == 0, report["failures"][:5]

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(files[0]), sess_options=opts, providers=["CPUExecutionProvider"])
    t1 = time.perf_counter()
    (got,) = sess.run(None, {n: t.numpy() for n, t in zip(contract.input_names(), inputs)})
    t_step = time.perf_counter() - t1
    assert got.shape == (3, 4, 32, 32) and np.isfinite(got).all()
    diff = float(np.abs(got - expected).max())
    assert diff < 1e-2, diff  # 860 M random weights, fp32 both sides

    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB
    log.warning(
        "sd15 UNet: export %.0f s, ORT step %.1f s, graph %d nodes, data %.2f GB, max abs diff %.1e, peak RSS %.1f GiB",
        t_export, t_step, report["nodes"], files[1].stat().st_size / 1e9, diff, peak_gib,
    )
    assert peak_gib < MEMORY_LIMIT_GIB
