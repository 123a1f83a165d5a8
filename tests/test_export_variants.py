"""Precision variants added to the tiny export: int8 Q/DQ (calibrated on training pairs, run in
onnxruntime on CPU, PSNR and size recorded) and fp16 (for GPU providers); the export table itself."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from lftk.cli import main
from lftk.errors import LftkError, NotAvailableError
from lftk.runtime.manifest import read_manifest, sha256_file, verify_manifest
from lftk.runtime.precision import TARGETS, Format, Precision, plan, precision_help, targets_in


def _cli(monkeypatch, *args) -> int:
    monkeypatch.setattr("sys.argv", ["lftk", "export", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        main()
    return info.value.code


@pytest.fixture(scope="module")
def int8_export(tiny_export_dir, tiny_pairs_dir, tmp_path_factory):
    from lftk.export.run import run_export

    export = tmp_path_factory.mktemp("int8") / "export"
    shutil.copytree(tiny_export_dir, export)
    summary = run_export(export, onnx=False, precision="int8", calib=tiny_pairs_dir, check_trt=True, calib_pairs=2)
    return export, summary


def test_int8_graph_runs_in_onnxruntime_on_cpu(int8_export, tiny_export_dir):
    import onnx
    import onnxruntime as ort

    export, summary = int8_export
    path = export / "onnx" / "unet.int8.onnx"
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    zero_points = [i for i in model.graph.initializer if i.name.endswith("zero_point")]
    assert zero_points and all(onnx.numpy_helper.to_array(z).dtype == np.int8 for z in zero_points)
    assert all(not onnx.numpy_helper.to_array(z).any() for z in zero_points)  # symmetric, as TensorRT needs
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((3, 8, 16, 16), np.float32), "timestep": np.full(3, 500.5, np.float32),
             "encoder_hidden_states": rng.standard_normal((3, 77, 32), np.float32)}
    (out,) = sess.run(None, feeds)
    assert out.shape == (3, 4, 16, 16) and np.isfinite(out).all()
    # The fp32 graphs are untouched by adding a variant.
    for name in ("unet", "vae_decoder"):
        assert sha256_file(export / f"onnx/{name}.onnx") == sha256_file(tiny_export_dir / f"onnx/{name}.onnx")
    assert summary["precisions"] == ["onnx:fp32", "onnx:int8"]


def test_int8_psnr_and_size_are_recorded(int8_export, tiny_pairs_dir):
    export, _ = int8_export
    parity = json.loads((export / "parity.json").read_text())["int8"]
    # Closer to the fp32 frame than a change of seed gets, by the stated margin.
    assert parity["passed"] and parity["psnr_db_vs_fp32"] >= parity["min_db"] >= parity["seed_baseline_db"]
    assert parity["frame"].startswith("task__episode")  # a held-out (test split) frame, not the calibration ones
    assert parity["providers"] == ["CPUExecutionProvider"]
    assert 0 < parity["unet_bytes"] < parity["unet_fp32_bytes"]
    manifest = verify_manifest(export)
    var = manifest["components"]["unet"]["variants"]["int8"]
    assert var["files"][0]["path"] == "onnx/unet.int8.onnx" and var["files"][0]["bytes"] == parity["unet_bytes"]
    assert var["source_sha256"] == manifest["components"]["unet"]["files"][0]["sha256"]
    calib = var["calibration"]
    assert calib["pair_dir"] == str(tiny_pairs_dir) and calib["split"] == "train" and calib["pairs"] == 2
    assert calib["unet_batches"] == 2 * 8 and len(calib["timesteps"]) == 8  # every step of every pair, 3 CFG rows each
    assert var["quantization"]["format"] == "QDQ" and var["quantization"]["QuantizeLinear"] > 0
    assert manifest["parity"]["int8_frame_psnr_db_vs_fp32"] == parity["psnr_db_vs_fp32"]
    assert manifest["trt_check"]["passed"] and manifest["trt_check"]["graphs"] == 5  # int8 graph checked too
    assert "vae_decoder" not in {c for c, comp in manifest["components"].items() if comp.get("variants")}
    assert [t.key for t in targets_in(manifest)] == ["onnx:fp32", "onnx:int8"]
    lines = {(s["name"], s.get("item")): s for s in manifest["stages"]}
    assert lines[("int8", "unet")]["status"] == "ok" and lines[("int8", "unet")]["bytes"] == parity["unet_bytes"]


def test_eval_scores_the_int8_graphs_beside_fp32_on_the_same_pairs(int8_export, tiny_pairs_dir, tmp_path):
    """`lftk eval --backend ort --precision int8`: the quality cost of quantisation in eval's own table."""
    from lftk.eval.evaluate import evaluate

    export = int8_export[0]
    fp32 = evaluate(export, tiny_pairs_dir, tmp_path / "fp32", baselines=["copy"], steps=2, backend="ort")
    int8 = evaluate(export, tiny_pairs_dir, tmp_path / "int8", baselines=["copy"], steps=2, backend="ort", precision="int8")
    assert (fp32["settings"]["precision"], int8["settings"]["precision"]) == ("fp32", "int8")
    model = {name: [r["metrics"]["model"]["psnr"] for r in rep["rows"]] for name, rep in (("fp32", fp32), ("int8", int8))}
    assert model["fp32"] != model["int8"]  # the int8 UNet ran, not the fp32 graphs again
    assert [r["metrics"]["copy"] for r in fp32["rows"]] == [r["metrics"]["copy"] for r in int8["rows"]]  # same pairs
    assert "on ort (int8)" in (tmp_path / "int8" / "report.md").read_text()
    # `lftk eval --compare`: int8 against fp32, paired over the same samples, each side named by its precision
    from lftk.eval.compare import compare_reports, format_comparison

    cmp = compare_reports(tmp_path / "fp32", tmp_path / "int8")
    assert cmp["paired"] and cmp["n_common"] == len(fp32["rows"])
    psnr = next(r for r in cmp["rows"] if r["metric"] == "psnr")
    assert psnr["diff"]["mean"] == pytest.approx(np.mean(model["int8"]) - np.mean(model["fp32"]), abs=1e-6)
    table = format_comparison(cmp)
    assert "on ort (fp32)" in table.splitlines()[0] and "on ort (int8)" in table.splitlines()[1]


def test_fp16_variant_for_gpu_providers(tiny_export_dir, tmp_path, monkeypatch, capsys):
    import onnx

    export = tmp_path / "export"
    shutil.copytree(tiny_export_dir, export)
    assert _cli(monkeypatch, export, "--no-onnx", "--precision", "fp16") in (0, None)
    out = capsys.readouterr()
    assert "onnx:fp16" in out.out and f"next: lftk bench --model {export} --backends torch,ort" in out.out
    manifest = verify_manifest(export)
    for name, comp in manifest["components"].items():
        var = comp["variants"]["fp16"]
        path = export / var["files"][0]["path"]
        assert path.name == f"{name}.fp16.onnx"
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path))
        io = [t.type.tensor_type.elem_type for t in (*model.graph.input, *model.graph.output)]
        assert all(t in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64) for t in io), name  # the contract's dtypes
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer), name
    unet = onnx.shape_inference.infer_shapes(onnx.load(str(export / "onnx/unet.fp16.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in unet.graph.value_info}
    sin = next(n for n in unet.graph.node if n.op_type == "Sin")
    assert types[sin.input[0]] == onnx.TensorProto.FLOAT  # the timestep embedding stays fp32
    parity = json.loads((export / "parity.json").read_text())["fp16"]
    # A number only when a provider really ran the graphs, with the provider named.
    assert parity["psnr_db_vs_fp32"] is None and parity["status"].startswith("not run") or (
        parity["psnr_db_vs_fp32"] > 30 and parity["providers"] == ["CPUExecutionProvider"]
    )


# ------------------------------------------------------------------ the export table


def test_plan_follows_the_table():
    keys = lambda *a, **k: [t.key for t in plan(*a, **k)]  # noqa: E731
    assert keys("fp32", onnx=True, trt=False) == ["onnx:fp32"]
    # the engines' sources come first: the Q/DQ UNet, and the fp16 graphs of the components left unquantized
    assert keys("int8", onnx=True, trt=True) == ["onnx:fp32", "onnx:int8", "onnx:fp16", "trt:int8"]
    assert keys("int8", onnx=False, trt=True) == ["onnx:int8", "onnx:fp16", "trt:int8"]
    assert keys("fp16", onnx=False, trt=True) == ["onnx:fp16", "trt:fp16"]  # strongly typed: from the fp16 graphs
    assert keys("fp16", onnx=False, trt=False) == ["onnx:fp16"]
    with pytest.raises(LftkError, match="no trt export at fp32: trt offers fp16, int8"):
        plan("fp32", onnx=True, trt=True)
    with pytest.raises(LftkError, match="--calib does not apply to --precision fp16: it is for int8"):
        plan("fp16", onnx=True, trt=False, calib=True)
    with pytest.raises(NotAvailableError, match="fp8.*planned"):
        plan("fp8", onnx=True, trt=False)
    with pytest.raises(LftkError, match="unknown precision 'bf16'"):
        plan("bf16", onnx=True, trt=False)


def test_help_and_rows_come_from_one_table():
    text = precision_help()
    for p in Precision:
        assert p.value in text
    assert "fp8 (planned)" in text
    assert {(t.format, t.precision) for t in TARGETS if t.available} == {
        (Format.ONNX, Precision.FP32), (Format.ONNX, Precision.FP16), (Format.ONNX, Precision.INT8),
        (Format.TRT, Precision.FP16), (Format.TRT, Precision.INT8),
    }
    int8 = next(t for t in TARGETS if t.key == "trt:int8")
    assert int8.precision_of("unet") == Precision.INT8 and int8.precision_of("vae_decoder") == Precision.FP16


def test_trt_without_gpu_or_tensorrt_exits_2_saying_what_is_missing(tiny_export_dir, monkeypatch, capsys):
    from lftk.runtime.trt_engine import machine

    if not machine()["missing"]:
        pytest.skip("this machine has a GPU and TensorRT")
    assert _cli(monkeypatch, tiny_export_dir, "--no-onnx", "--trt", "--precision", "fp16") == 2
    err = capsys.readouterr().err
    assert "error: TensorRT engines need" in err and ("CUDA GPU" in err or "TensorRT Python package" in err)
    assert read_manifest(tiny_export_dir).get("engines") is None  # nothing was touched
