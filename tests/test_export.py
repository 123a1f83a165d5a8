"""ONNX export of the tiny pipeline: artifacts, checker, bare onnxruntime sessions, parity, manifest."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lftk.errors import LftkError
from lftk.runtime.contract import (
    CFG_BRANCHES,
    COMPONENTS,
    ComponentContract,
    UnetContract,
    build_contracts,
)
from lftk.runtime.manifest import read_manifest, sha256_file, verify_manifest

ONNX_FILES = {f"onnx/{c}.onnx" for c in COMPONENTS}


@pytest.fixture(scope="module")
def tiny_pipe(tiny_pipeline_dir):
    from lftk.model.base import load_pipeline

    return load_pipeline(tiny_pipeline_dir)


def test_export_writes_the_artifact_set(tiny_export_dir):
    d = tiny_export_dir
    assert {p.relative_to(d).as_posix() for p in (d / "onnx").iterdir()} == ONNX_FILES
    for name in ("model_index.json", "lftk_model.json", "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json"):
        assert (d / "pipeline" / name).is_file(), name
    manifest = read_manifest(d)
    assert manifest["opset"] == 17
    assert manifest["resolution"] == 64 and manifest["latent_resolution"] == 16
    assert manifest["scaling_factor"] == pytest.approx(1.0)
    assert set(manifest["versions"]) >= {"torch", "onnx", "onnxruntime", "lftk"}
    assert list(manifest["components"]) == list(COMPONENTS)
    for name, comp in manifest["components"].items():
        (rec,) = comp["files"]
        assert rec["path"] == f"onnx/{name}.onnx"
        assert rec["sha256"] == sha256_file(d / rec["path"])
    unet = manifest["components"]["unet"]
    assert [t["name"] for t in unet["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
    assert unet["inputs"][0]["shape"] == ["B", 8, 16, 16]
    assert unet["inputs"][1] == {"name": "timestep", "dtype": "float32", "shape": ["B"]}
    assert unet["outputs"][0]["name"] == "noise_pred"
    assert unet["batch_profile"] == {"min": 1, "opt": 3, "max": 48}  # min 1: sampling without guidance branches


def test_graphs_pass_checker_and_run_in_a_bare_session(tiny_export_dir):
    import onnx
    import onnxruntime as ort

    manifest = read_manifest(tiny_export_dir)
    rng = np.random.default_rng(0)
    for name, comp in manifest["components"].items():
        path = tiny_export_dir / comp["files"][0]["path"]
        onnx.checker.check_model(str(path))
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == [t["name"] for t in comp["inputs"]]
        # The opt batch and one beyond it: the batch axis really is dynamic.
        for batch in (comp["batch_profile"]["opt"], 2 * CFG_BRANCHES):
            feeds = {}
            for t in comp["inputs"]:
                shape = [batch if d == "B" else d for d in t["shape"]]
                if t["dtype"] == "int64":
                    feeds[t["name"]] = rng.integers(0, 49408, shape, dtype=np.int64)
                else:
                    feeds[t["name"]] = rng.standard_normal(shape).astype(np.float32)
            (out,) = sess.run(None, feeds)
            expect = [batch if d == "B" else d for d in comp["outputs"][0]["shape"]]
            assert list(out.shape) == expect, name
            assert np.isfinite(out).all(), name


def test_parity_within_stated_tolerance(tiny_export_dir):
    report = json.loads((tiny_export_dir / "parity.json").read_text())
    assert report["passed"] and not report["failures"]
    for name in COMPONENTS:
        r = report["components"][name]
        assert r["max_abs_diff"] <= r["tol"] <= 2e-3, name
    assert report["frame"]["psnr_db"] >= 40.0
    assert report["providers"] == ["CPUExecutionProvider"]


def test_parity_catches_a_graph_that_drifted_from_its_weights(tiny_pipe, tiny_export_dir):
    from lftk.export.parity import check_parity, raise_on_failure

    contracts = build_contracts(tiny_pipe, 64)
    conv = tiny_pipe.unet.conv_out
    saved = conv.bias.detach().clone()
    try:
        with torch.no_grad():
            conv.bias += 0.05  # the torch UNet now differs from the exported one
        report = check_parity(tiny_pipe, contracts, tiny_export_dir / "onnx", 64)
    finally:
        with torch.no_grad():
            conv.bias.copy_(saved)
    assert not report["passed"]
    with pytest.raises(LftkError, match=r"parity failed: unet max abs diff .* > tol 1e-03"):
        raise_on_failure(report)
    assert report["components"]["text_encoder"]["max_abs_diff"] <= 1e-3  # the others still agree


def test_tampered_graph_is_refused_with_a_rebuild_hint(tiny_export_dir, tmp_path):
    from lftk.runtime.backends import OrtBackend

    copy = tmp_path / "export"
    shutil.copytree(tiny_export_dir, copy)
    verify_manifest(copy)  # the untouched copy is fine
    target = copy / "onnx" / "unet.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight: same size, different content
    target.write_bytes(bytes(data))
    with pytest.raises(LftkError, match=r"unet\.onnx.*changed since export.*lftk export .* --onnx --out"):
        verify_manifest(copy)
    with pytest.raises(LftkError, match="unet.onnx"):
        OrtBackend(copy)
    target.unlink()
    with pytest.raises(LftkError, match=r"unet\.onnx: missing"):
        verify_manifest(copy)


def test_graphs_past_2gb_ship_as_one_external_data_file(tmp_path):
    """Past 2 GB the exporter spills one file per tensor next to the graph; _place gathers them."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from lftk.export.onnx_export import _place

    weights = [numpy_helper.from_array(np.full((64, 64), i, np.float32), f"w{i}") for i in range(3)]
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"y{i - 1}", f"w{i}"], [f"y{i}"]) for i in range(3)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, 64])], initializer=weights,
    )
    spill = tmp_path / "spill"
    spill.mkdir()
    onnx.save_model(helper.make_model(graph), str(spill / "unet.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(spill.iterdir())) == 4  # the graph + one file per tensor
    dest = tmp_path / "onnx" / "unet.onnx"
    dest.parent.mkdir()
    files = _place(spill / "unet.onnx", dest)
    assert [f.name for f in files] == ["unet.onnx", "unet.onnx.data"]
    assert sorted(p.name for p in dest.parent.iterdir()) == ["unet.onnx", "unet.onnx.data"]
    onnx.checker.check_model(str(dest))
    loaded = onnx.load(str(dest))
    assert numpy_helper.to_array(loaded.graph.initializer[2])[0, 0] == 2.0


def test_manifest_required(tmp_path):
    with pytest.raises(LftkError, match="not an export dir"):
        verify_manifest(tmp_path)


def test_contract_is_abstract_and_shapes_agree(tiny_pipe):
    with pytest.raises(TypeError):
        ComponentContract(None)  # abstract: a new component must state its interface
    contracts = build_contracts(tiny_pipe, 64)
    assert list(contracts) == list(COMPONENTS)
    for name, c in contracts.items():
        prof = c.batch_profile
        assert prof.min <= prof.opt <= prof.max
        for batch in (prof.min, prof.max):
            for spec, tensor in zip(c.inputs(), c.sample_inputs(batch)):
                assert tuple(tensor.shape) == spec.concrete(batch)
                assert str(tensor.dtype) == f"torch.{spec.dtype}"
        # Only the batch axis is dynamic; spatial sizes are fixed at export.
        assert all(axes == {0: "batch"} for axes in c.dynamic_axes().values()), name
    unet = contracts["unet"]
    assert isinstance(unet, UnetContract)
    assert unet.batch_profile.opt == CFG_BRANCHES and unet.batch_profile.max % CFG_BRANCHES == 0 and unet.batch_profile.min == 1
    (ts,) = [t for t in unet.sample_inputs() if t.ndim == 1]
    assert ts.dtype == torch.float32 and not torch.equal(ts, ts.round())  # fractional timesteps


def test_resolution_must_fit_the_model(tiny_pipe):
    with pytest.raises(LftkError, match="multiple of 8"):
        build_contracts(tiny_pipe, 60)


def test_resolution_choice(tmp_path):
    from lftk.runtime.resolution import pick_resolution
    from lftk.model.base import write_meta

    pipe = SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(sample_size=512)))
    assert pick_resolution(tmp_path, pipe, None) == 512  # no record: the VAE's native size
    with pytest.raises(LftkError, match=r"vae/config.json: no sample_size"):
        pick_resolution(tmp_path, None, None)  # not loaded, and no VAE config on disk either
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text('{"sample_size": 256}')
    assert pick_resolution(tmp_path, None, None) == 256  # not loaded: read from the pipeline dir
    write_meta(tmp_path, {"resolution": 64})
    assert pick_resolution(tmp_path, pipe, None) == 64  # the trained resolution
    assert pick_resolution(tmp_path, pipe, 128) == 128  # an explicit request wins (with a warning)


def test_export_refuses_a_non_model(tmp_path):
    from lftk.export.onnx_export import export_onnx

    with pytest.raises(LftkError, match="not a model dir"):
        export_onnx(tmp_path, tmp_path / "out")
