"""`--check-trt` on CPU: TensorRT's published operator list, its restrictions, and the shape profiles;
plus the manifest's refusal of engines built for another machine (no TensorRT needed for either)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from lftk.cli import main
from lftk.errors import LftkError
from lftk.export import trt_ops
from lftk.runtime.manifest import (
    check_engines, component_files, file_record, graph_sha256, read_manifest, verify_manifest, write_manifest,
)
from lftk.export.trt_check import check_export, check_graph, check_profiles, raise_on_failure

F = TensorProto.FLOAT


def _save(tmp_path, nodes, inputs, outputs, inits=(), name="g.onnx", opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    path = tmp_path / name
    path.write_bytes(model.SerializeToString())
    return path


def _x(shape=(1, 4, 8, 8), dtype=F, name="x"):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def test_the_tiny_export_passes(tiny_export_dir):
    report = check_export(tiny_export_dir, read_manifest(tiny_export_dir))
    assert report["passed"], report["failures"][:3]
    assert [g["graph"] for g in report["graphs"]] == [f"onnx/{c}.onnx" for c in ("text_encoder", "vae_encoder", "unet", "vae_decoder")]
    unet = report["graphs"][2]
    assert unet["nodes"] > 500 and {"Conv", "MatMul", "Resize", "Gemm"} <= set(unet["ops"])
    assert unet["untyped_nodes"] == 0  # every node's type was known, so every type check ran
    assert "10.1" in report["source"]


def test_an_unsupported_operator_is_refused_with_the_nodes_name(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="fine_relu"), helper.make_node("Unique", ["r"], ["y"], name="the_culprit")]
    path = _save(tmp_path, nodes, [_x((6,))], [_x((None,), name="y")])
    report = check_graph(path)
    (failure,) = report["failures"]
    assert failure["node"] == "the_culprit" and "Unique is listed as unsupported" in failure["reason"]
    with pytest.raises(LftkError, match=r"g\.onnx: node the_culprit: Unique is listed as unsupported"):
        raise_on_failure({"failures": report["failures"]})


def _qdq_nodes(zero_point_dtype, zp):
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zero = numpy_helper.from_array(np.array(zp, zero_point_dtype), "z")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="quant"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dequant")]
    return nodes, [scale, zero]


@pytest.mark.parametrize(
    "case, reason",
    [
        ("uint8_asymmetric_qdq", "zero_point` must be zero"),
        ("resize_cubic", "mode 'cubic' unsupported"),
        ("slice_dynamic_axes", "`axes` must be an initializer"),
        ("relu_int8", "Relu on INT8 unsupported"),
        ("custom_domain", "custom-domain op com.microsoft::FusedGemm"),
        ("opset_21", "opset 21 outside TensorRT's 9..20"),
    ],
)
def test_restrictions_of_the_list_are_enforced(tmp_path, case, reason):
    inits, opset, x, y = [], 17, _x(), _x(name="y")
    if case == "uint8_asymmetric_qdq":  # what onnxruntime's default (asymmetric uint8) quantization makes
        nodes, inits = _qdq_nodes(np.uint8, 128)
    elif case == "resize_cubic":
        inits = [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
        nodes = [helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="cubic", name="up")]
        y = _x((1, 4, 16, 16), name="y")
    elif case == "slice_dynamic_axes":
        i64 = TensorProto.INT64
        x2 = [helper.make_tensor_value_info(n, i64, [1]) for n in ("starts", "ends", "axes")]
        nodes = [helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["y"], name="cut")]
        x, y = [x, *x2], _x((None, None, None, None), name="y")
    elif case == "relu_int8":
        nodes = [helper.make_node("Relu", ["x"], ["y"], name="r")]
        x, y = _x(dtype=TensorProto.INT8), _x(dtype=TensorProto.INT8, name="y")
    elif case == "custom_domain":
        nodes = [helper.make_node("FusedGemm", ["x", "x"], ["y"], domain="com.microsoft", name="fused")]
    else:
        nodes, opset = [helper.make_node("Relu", ["x"], ["y"], name="r")], 21
    inputs = x if isinstance(x, list) else [x]
    path = _save(tmp_path, nodes, inputs, [y], inits, opset=opset)
    reasons = [f["reason"] for f in check_graph(path)["failures"]]
    assert any(reason in r for r in reasons), reasons


def test_symmetric_int8_qdq_passes(tmp_path):
    nodes, inits = _qdq_nodes(np.int8, 0)
    assert check_graph(_save(tmp_path, nodes, [_x()], [_x(name="y")], inits))["failures"] == []


def test_profiles_must_agree_with_the_graphs_axes(tmp_path):
    from onnx import load

    path = _save(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], [_x((3, 4))], [_x((3, 4), name="y")])
    model = load(str(path))
    described = {"inputs": [{"name": "x", "dtype": "float32", "shape": ["B", 4]}],
                 "outputs": [{"name": "y", "dtype": "float32", "shape": ["B", 4]}],
                 "batch_profile": {"min": 1, "opt": 3, "max": 8}}
    (problem,) = check_profiles(model, described)
    assert "x axis 0: static 3 in the graph but the profile asks 1/3/8" in problem
    described["inputs"][0]["name"] = "image"
    assert "differ from the manifest's ['image']" in check_profiles(model, described)[0]


def test_table_lists_what_the_export_uses():
    for op in ("Conv", "MatMul", "Gemm", "Resize", "InstanceNormalization", "LayerNormalization", "Softmax",
               "QuantizeLinear", "DequantizeLinear", "Erf", "Trilu", "Where", "Sin", "Cos"):
        assert op in trt_ops.SUPPORTED, op
    assert not set(trt_ops.SUPPORTED) & trt_ops.UNSUPPORTED
    assert trt_ops.OPSET_RANGE == (9, 20)


def test_check_trt_cli_refuses_a_graph_with_an_unsupported_op(tiny_export_dir, tmp_path, monkeypatch, capsys):
    """The acceptance case end to end: an exported graph gains an op TensorRT lacks; --check-trt names it."""
    import onnx

    export = tmp_path / "export"
    shutil.copytree(tiny_export_dir, export)
    path = export / "onnx" / "unet.onnx"
    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if n.op_type == "Erf")
    node.op_type = "Bernoulli"  # float in, float out: valid ONNX, listed "N" by TensorRT
    onnx.save(model, str(path))
    manifest = read_manifest(export)
    manifest["components"]["unet"]["files"] = [file_record(export, "onnx/unet.onnx")]
    write_manifest(export, manifest)
    monkeypatch.setattr("sys.argv", ["lftk", "export", str(export), "--no-onnx", "--check-trt"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"onnx/unet.onnx: node {node.name}: Bernoulli is listed as unsupported" in err
    assert json.loads((export / "manifest.json").read_text())["trt_check"]["passed"] is False


# ------------------------------------------------------------------ engines vs machine (manifest side)


@pytest.fixture()
def export_with_engine(tiny_export_dir, tmp_path):
    """A copy of the tiny export whose manifest lists an fp16 UNet 'engine' built with TensorRT 10.3 on sm 8.9."""
    export = tmp_path / "export"
    shutil.copytree(tiny_export_dir, export)
    (export / "trt").mkdir()
    (export / "trt" / "unet.fp16.engine").write_bytes(b"not really an engine")
    manifest = read_manifest(export)
    graph = component_files(manifest, "unet", "fp32")
    manifest["engines"] = {"fp16": {"tensorrt": "10.3.0", "compute_capability": "8.9", "gpu": "NVIDIA L4", "components": {
        "unet": {"files": [file_record(export, "trt/unet.fp16.engine")], "precision": "fp16", "onnx": graph[0]["path"],
                 "graph_precision": "fp32", "onnx_sha256": graph_sha256(graph)}}}}
    write_manifest(export, manifest)
    return export


def test_engines_for_another_machine_are_refused_with_the_rebuild_command(export_with_engine):
    export = export_with_engine
    manifest = verify_manifest(export)  # engine files are hashed like graphs
    assert check_engines(export, manifest, "fp16", "10.3.0", "8.9")["gpu"] == "NVIDIA L4"
    rebuild = f"lftk export {export} --no-onnx --trt --precision fp16 --out {export}"
    with pytest.raises(LftkError, match=r"built with TensorRT 10\.3\.0, this machine has 10\.8\.0") as info:
        check_engines(export, manifest, "fp16", "10.8.0", "8.9")
    assert rebuild in str(info.value)
    with pytest.raises(LftkError, match=r"compute capability 8\.9 \(NVIDIA L4\), this GPU is 9\.0"):
        check_engines(export, manifest, "fp16", "10.3.0", "9.0")
    with pytest.raises(LftkError, match=r"no TensorRT int8 engines \(built: fp16\)"):
        check_engines(export, manifest, "int8", "10.3.0", "8.9")
    manifest["engines"]["fp16"]["components"]["unet"]["onnx_sha256"] = "0" * 64  # from an older graph
    with pytest.raises(LftkError, match=r"unet fp16 engine was built from another onnx/unet\.onnx"):
        check_engines(export, manifest, "fp16", "10.3.0", "8.9")


def test_a_changed_engine_file_is_refused(export_with_engine):
    (export_with_engine / "trt" / "unet.fp16.engine").write_bytes(b"not really an engine, changed")
    with pytest.raises(LftkError, match=r"unet\.fp16\.engine: content differs .* --no-onnx --trt --precision fp16"):
        verify_manifest(export_with_engine)


def test_an_edited_manifest_is_refused(tiny_export_dir, tmp_path):
    from lftk.runtime.backends import OrtBackend

    export = tmp_path / "export"
    shutil.copytree(tiny_export_dir, export)
    path = export / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["resolution"] = 128  # a hand edit: every file still matches its hash
    path.write_text(json.dumps(manifest, indent=2))
    with pytest.raises(LftkError, match=r"manifest\.json: edited after export .* rebuild with: lftk export"):
        verify_manifest(export)
    with pytest.raises(LftkError, match="edited after export"):
        OrtBackend(export)
