"""The torch backend's device, precision and compiled modes.

CPU tier: what is refused, and bf16 on CPU. `gpu` tier (a CUDA machine, unchanged): fp16 eager and
compiled (CUDA graphs) against fp32, tensors kept on the GPU. `slow` tier: torch.compile on CPU
(inductor builds C++ kernels: minutes on 2 cores)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lftk.runtime.backends import TorchBackend
from lftk.runtime.backends import open_backend
from lftk.runtime.runner import Runner
from lftk.errors import LftkError, NotAvailableError
from lftk.eval.metrics import psnr_db
from lftk.export.parity import parity_image

STEPS = 2
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _frames(n: int = 2) -> np.ndarray:
    return np.concatenate([parity_image(64, seed=k) for k in range(n)])


def _predict(backend) -> np.ndarray:
    return Runner.from_backend(backend, scheduler="ddim").predict(_frames(), "stack the blocks", STEPS, seed=0)


def test_refusals(tiny_pipeline_dir, tiny_export_dir):
    with pytest.raises(LftkError, match="unknown torch precision 'int8'"):
        TorchBackend(tiny_pipeline_dir, precision="int8")
    if not torch.cuda.is_available():
        with pytest.raises(NotAvailableError, match="fp16 runs on a CUDA GPU"):
            TorchBackend(tiny_pipeline_dir, precision="fp16")
        with pytest.raises(NotAvailableError, match="no CUDA GPU"):
            TorchBackend(tiny_pipeline_dir, device="cuda")
    with pytest.raises(LftkError, match="--compile is for --backend torch"):
        open_backend(tiny_export_dir, "ort", compile=True)


def test_bf16_on_cpu_stays_close_to_fp32(tiny_pipeline_dir):
    ref = _predict(TorchBackend(tiny_pipeline_dir, device="cpu"))
    be = TorchBackend(tiny_pipeline_dir, device="cpu", precision="bf16")
    assert be.providers[0].startswith("torch:cpu") and "bf16" in be.providers[0]
    assert next(be.modules["unet"].parameters()).dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: close, not equal (the tiny model's random weights amplify it).
    assert 15.0 <= psnr_db(ref / 255.0, _predict(be) / 255.0) < 100.0


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision, compile", [("fp32", False), ("fp16", False), ("fp16", True), ("bf16", True)])
def test_cuda_modes_match_cpu_fp32(tiny_pipeline_dir, precision, compile):
    ref = _predict(TorchBackend(tiny_pipeline_dir, device="cpu"))
    be = TorchBackend(tiny_pipeline_dir, device="cuda", precision=precision, compile=compile)
    out = _predict(be)
    minimum = {"fp32": 40.0, "fp16": 30.0, "bf16": 20.0}[precision]
    assert psnr_db(ref / 255.0, out / 255.0) >= minimum
    # The sampler's tensors stay on the GPU between calls: the UNet's output is a CUDA tensor.
    embeds = be.encode_text(torch.zeros(3, 77, dtype=torch.int64))
    assert embeds.is_cuda and be.unet(torch.zeros(3, 8, 16, 16), torch.zeros(3), embeds).is_cuda


@pytest.mark.slow
def test_compiled_on_cpu_matches_eager(tiny_pipeline_dir):
    ref = _predict(TorchBackend(tiny_pipeline_dir, device="cpu"))
    out = _predict(TorchBackend(tiny_pipeline_dir, device="cpu", compile=True))
    assert psnr_db(ref / 255.0, out / 255.0) >= 40.0
