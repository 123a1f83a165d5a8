"""`lftk export RUN` end to end, in-process: adapters merged from the run's metadata, dynamic H/W graphs,
--check-trt, one stage line each, and the exact next commands."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lftk.cli import main
from lftk.errors import LftkError
from lftk.runtime.contract import COMPONENTS
from lftk.runtime.manifest import verify_manifest


@pytest.fixture(scope="module")
def run_export_dir(lora_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("run_export") / "export"
    mp = pytest.MonkeyPatch()
    mp.setattr("sys.argv", ["lftk", "export", str(lora_run), "--dynamic-shape", "--check-trt", "--check-merge", "--out", str(out)])
    with pytest.raises(SystemExit) as info:
        main()
    mp.undo()
    assert info.value.code in (0, None)
    return out


def test_the_run_is_merged_and_its_metadata_travels(run_export_dir, lora_run):
    from safetensors.torch import load_file

    manifest = verify_manifest(run_export_dir)
    assert manifest["source"] == str(lora_run.resolve())
    model = manifest["model"]
    assert model["trainable"] == "lora" and model["lora"]["rank"] == 4 and model["horizon"] == 10
    assert model["prompt_template"] == "Scene after '{instruction}'" and model["merged_lora"]["max_abs_diff_vs_source"] <= 1e-4
    pipe = run_export_dir / "pipeline"
    assert not (pipe / "lora").exists()  # a plain pipeline: stock loaders and the torch backend read it
    name = "unet/diffusion_pytorch_model.safetensors"
    ours, final = load_file(pipe / name), load_file(lora_run / "final" / name)
    assert max((ours[k] - final[k]).abs().max().item() for k in final) <= 1e-4
    stages = [(s["name"], s.get("item"), s["status"]) for s in manifest["stages"]]
    assert stages[0] == ("merge", "lora", "ok")
    assert [s for s in stages if s[0] == "onnx"] == [("onnx", c, "ok") for c in COMPONENTS]
    assert ("check", "tensorrt", "ok") in stages and manifest["trt_check"]["passed"]
    for s in manifest["stages"]:
        assert s["seconds"] >= 0 and (s["name"] != "onnx" or s["bytes"] > 0)


def test_dynamic_height_and_width(run_export_dir):
    import onnxruntime as ort

    manifest = verify_manifest(run_export_dir)
    assert manifest["dynamic_shape"] is True
    unet = manifest["components"]["unet"]
    assert unet["inputs"][0]["shape"] == ["B", 8, "h", "w"]
    assert unet["resolution_profile"] == {"min": 32, "opt": 64, "max": 128}
    parity = json.loads((run_export_dir / "parity.json").read_text())
    assert parity["components"]["unet"]["resolutions"] == [32, 64]  # parity ran off the trained size too
    rng = np.random.default_rng(0)
    sess = ort.InferenceSession(str(run_export_dir / "onnx/vae_decoder.onnx"), providers=["CPUExecutionProvider"])
    dims = sess.get_inputs()[0].shape  # ORT names symbolic axes, numbers static ones
    assert dims == ["batch", 4, "latent_height", "latent_width"]
    for side in (8, 24):  # latent sides, 32 and 96 px: neither is the trained 64 px
        (image,) = sess.run(None, {"latent": rng.standard_normal((1, 4, side, side), np.float32)})
        assert image.shape == (1, 3, 4 * side, 4 * side)


def test_next_commands_are_exact(run_export_dir, tiny_pairs_dir, lora_run, monkeypatch, capsys):
    # Re-running on the export dir adds nothing but prints the same next commands: check them from stdout.
    monkeypatch.setattr("sys.argv", ["lftk", "export", str(run_export_dir), "--no-onnx", "--check-trt"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code in (0, None)
    lines = capsys.readouterr().out.strip().splitlines()
    frame = sorted((tiny_pairs_dir / "test").iterdir())[0] / "000000_0.jpg"
    assert lines[-2] == f"next: lftk infer --model {run_export_dir} --image {frame} --instruction 'stack blocks' --backend ort"
    assert lines[-1] == f"next: lftk bench --model {run_export_dir} --backends torch,ort"


def test_a_run_exports_its_final_as_written_without_the_base(lora_run, tmp_path):
    """The default: final/ is already merged; export neither needs the base nor fuses again."""
    import shutil

    from safetensors.torch import load_file

    from lftk.export.run import run_export
    from lftk.model.base import read_meta, write_meta

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    write_meta(run / "final", {**read_meta(run / "final"), "base": str(tmp_path / "gone")})  # the base is not here
    summary = run_export(run, tmp_path / "export")
    manifest = verify_manifest(tmp_path / "export")
    merge = next(s for s in manifest["stages"] if s["name"] == "merge")
    assert merge["status"] == "skipped" and "merged as training wrote it" in merge["note"]
    pipe = tmp_path / "export" / "pipeline"
    assert not (pipe / "lora").exists()  # still a plain pipeline
    name = "unet/diffusion_pytorch_model.safetensors"
    ours, final = load_file(pipe / name), load_file(run / "final" / name)
    assert all((ours[k] == final[k]).all() for k in final)  # final/'s weights, bit for bit
    assert summary["precisions"] == ["onnx:fp32"]
    with pytest.raises(LftkError, match="gone"):
        run_export(run, tmp_path / "checked", check_merge=True)  # the opt-in check needs the base
