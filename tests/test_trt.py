"""TensorRT engines for the tiny export: fp16 and int8 (explicit Q/DQ) builds, parity against
onnxruntime, the content-addressed cache, and the manifest's machine check.

Tier `trt` (`pytest -m trt`): needs a CUDA GPU and the TensorRT 10.x Python package; skipped with
the reason elsewhere. Written against TensorRT's documented Python API; not run on the CPU machines
this project's CI has.
"""

from __future__ import annotations

import shutil

import pytest
import torch

trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (its wheels come from NVIDIA's index, pypi.nvidia.com)")

pytestmark = [
    pytest.mark.trt,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT engines need a CUDA GPU"),
]


@pytest.fixture(scope="module")
def trt_export(tiny_export_dir, tiny_pairs_dir, tmp_path_factory):
    from lftk.export.run import run_export

    root = tmp_path_factory.mktemp("trt")
    mp = pytest.MonkeyPatch()
    mp.setenv("LFTK_TRT_CACHE", str(root / "cache"))
    export = root / "export"
    shutil.copytree(tiny_export_dir, export)
    fp16 = run_export(export, onnx=False, trt=True, precision="fp16")
    int8 = run_export(export, onnx=False, trt=True, precision="int8", calib=tiny_pairs_dir, calib_pairs=2)
    yield export, fp16, int8, root / "cache"
    mp.undo()


def test_engines_are_recorded_for_this_machine(trt_export):
    from lftk.runtime.contract import COMPONENTS
    from lftk.runtime.manifest import check_engines, verify_manifest
    from lftk.runtime.trt_engine import machine

    export, *_ = trt_export
    manifest = verify_manifest(export)
    info = machine()
    assert set(manifest["engines"]) == {"fp16", "int8"}
    for precision, record in manifest["engines"].items():
        assert record["tensorrt"] == trt.__version__ and record["compute_capability"] == info["compute_capability"]
        assert list(record["components"]) == list(COMPONENTS)
        assert check_engines(export, manifest, precision, info["tensorrt"], info["compute_capability"]) is record
    int8 = manifest["engines"]["int8"]["components"]
    assert int8["unet"]["precision"] == "int8" and int8["unet"]["onnx"] == "onnx/unet.int8.onnx"
    assert int8["vae_decoder"]["precision"] == "fp16" and int8["vae_decoder"]["onnx"] == "onnx/vae_decoder.fp16.onnx"
    assert "trt:fp16" in manifest["precisions"] and "trt:int8" in manifest["precisions"]


def test_engines_agree_with_onnxruntime(trt_export):
    from lftk.runtime.manifest import read_manifest

    export, *_ = trt_export
    engines = read_manifest(export)["engines"]
    for precision, record in engines.items():
        parity = record["parity"]
        assert parity["passed"] and parity["frame_psnr_db_vs_ort"] >= parity["min_db"], (precision, parity)
    for name, diff in engines["fp16"]["parity"]["max_abs_diff"].items():
        assert diff < 5e-2, (name, diff)  # fp16 arithmetic on random tiny weights


def test_engine_runs_across_its_batch_profile(trt_export):
    from lftk.runtime.contract import profile_shapes
    from lftk.runtime.manifest import read_manifest
    from lftk.runtime.trt_engine import TrtEngine

    export, *_ = trt_export
    manifest = read_manifest(export)
    comp = manifest["components"]["unet"]
    engine = TrtEngine(export / manifest["engines"]["fp16"]["components"]["unet"]["files"][0]["path"],
                       [t["name"] for t in comp["inputs"]], "noise_pred")
    for shapes in zip(*profile_shapes(comp).values()):  # min, opt, max
        out = engine(*(torch.randn(s) for s in shapes))
        assert out.shape == (shapes[0][0], 4, 16, 16) and torch.isfinite(out).all()


def test_rebuilding_hits_the_cache(trt_export):
    from lftk.export.run import run_export

    export, first, _, cache = trt_export
    assert any(s["name"] == "trt" and "built" in s.get("note", "") for s in first["stages"])
    again = run_export(export, onnx=False, trt=True, precision="fp16")
    notes = [s.get("note", "") for s in again["stages"] if s["name"] == "trt"]
    assert notes and all(n.startswith("cache hit") for n in notes)
    assert list(cache.glob("timing-*.cache")), "no timing cache written"


def test_engine_for_another_gpu_is_refused(trt_export):
    from lftk.errors import LftkError
    from lftk.runtime.manifest import check_engines, read_manifest

    export, *_ = trt_export
    with pytest.raises(LftkError, match=r"compute capability .* this GPU is 1\.0.*--no-onnx --trt --precision fp16"):
        check_engines(export, read_manifest(export), "fp16", trt.__version__, "1.0")
