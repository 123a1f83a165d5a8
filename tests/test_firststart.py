"""The runtime image's entrypoint (lftk.deploy.firststart) on CPU: backend choice and its fallback, the
working copy of a read-only export, and engines built once per GPU then reused. TensorRT itself is
stood in for by a builder that records engines the way `lftk export --trt` does; the real build is
covered by the trt-marked export tests on a GPU machine."""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lftk.deploy import firststart
from lftk.errors import LftkError
from lftk.runtime.manifest import component_files, file_record, graph_sha256, read_manifest, write_manifest

H100 = {"tensorrt": "10.16.1.11", "compute_capability": "9.0", "gpu": "NVIDIA H100", "missing": []}
L40S = {**H100, "compute_capability": "8.9", "gpu": "NVIDIA L40S"}
CPU_BOX = {"tensorrt": None, "compute_capability": None, "gpu": None,
           "missing": ["a CUDA GPU (torch.cuda.is_available() is False)", "the TensorRT Python package"]}
SERVE = ["serve", "--model", "/models/export", "--host", "0.0.0.0", "--port", "8000"]


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def model(tiny_export_dir, tmp_path) -> Path:
    """A private copy of the tiny export, standing for the read-only mount."""
    return Path(shutil.copytree(tiny_export_dir, tmp_path / "models" / "export"))


class FakeBuild:
    """Records engines in an export's manifest the way `lftk export EXPORT --no-onnx --trt` does
    (engine files under trt/, the graph hash each came from, TensorRT version, compute capability)."""

    def __init__(self, info: dict):
        self.info, self.calls = info, []

    def __call__(self, work: Path, precision: str, env: dict) -> None:
        self.calls.append((work, precision, env["LFTK_TRT_CACHE"]))
        manifest = read_manifest(work)
        record = {"tensorrt": self.info["tensorrt"], "compute_capability": self.info["compute_capability"],
                  "gpu": self.info["gpu"], "components": {}}
        for name in manifest["components"]:
            engine = work / "trt" / f"{name}.{precision}.engine"
            engine.parent.mkdir(exist_ok=True)
            engine.unlink(missing_ok=True)  # as export/tensorrt.py `place` does: never write through a link
            engine.write_bytes(f"{name} for sm {self.info['compute_capability']}".encode())
            record["components"][name] = {
                "files": [file_record(work, engine.relative_to(work).as_posix())], "precision": precision,
                "graph_precision": "fp32", "onnx_sha256": graph_sha256(component_files(manifest, name)),
            }
        manifest.setdefault("engines", {})[precision] = record
        write_manifest(work, manifest)


# --- backend ---------------------------------------------------------------------------------------------

def test_auto_without_tensorrt_serves_with_onnxruntime_and_says_why(caplog):
    with caplog.at_level(logging.WARNING, logger="lftk.firststart"):
        argv = firststart.plan(SERVE, {}, machine=lambda: CPU_BOX)
    assert argv == SERVE + ["--backend", "ort"]
    said = caplog.text
    assert "TensorRT backend not available" in said and "a CUDA GPU" in said and "TensorRT Python package" in said
    assert "CPUExecutionProvider" in said  # where the fallback really runs


def test_explicit_trt_without_tensorrt_is_an_error_naming_what_is_missing():
    with pytest.raises(LftkError, match="trt backend needs a CUDA GPU .* and the TensorRT Python package"):
        firststart.plan(SERVE + ["--backend", "trt"], {}, machine=lambda: CPU_BOX)
    with pytest.raises(LftkError, match="LFTK_BACKEND='tensorrt': choose one of auto, trt, ort, torch"):
        firststart.plan(SERVE, {"LFTK_BACKEND": "tensorrt"}, machine=lambda: CPU_BOX)


def test_explicit_backends_and_other_commands_pass_through():
    never = lambda: pytest.fail("the machine is not asked when the backend is given")  # noqa: E731
    assert firststart.plan(SERVE + ["--backend=torch"], {}, machine=never) == SERVE + ["--backend", "torch"]
    assert firststart.plan(["infer", "--model", "m", "--image", "f.png", "--instruction", "x"], {"LFTK_BACKEND": "ort"},
                           machine=never)[-2:] == ["--backend", "ort"]
    for argv in (["doctor"], ["serve", "--help"], ["serve", "--model", "m", "--help"], ["bench", "--model", "m"],
                 ["export", "RUN", "--onnx"], []):
        assert firststart.plan(argv, {}, machine=never) == argv


def test_port_differing_from_the_healthcheck_is_warned(caplog):
    with caplog.at_level(logging.WARNING, logger="lftk.firststart"):
        firststart.plan(SERVE[:-1] + ["9000"], {"LFTK_PORT": "8000", "LFTK_BACKEND": "ort"})
    assert "HEALTHCHECK polls LFTK_PORT=8000" in caplog.text


# --- engines ------------------------------------------------------------------------------------------------

def test_engines_built_once_in_a_working_copy_then_reused(model, tmp_path):
    before = tree_digest(model)
    env = {"LFTK_CACHE": str(tmp_path / "cache")}
    build = FakeBuild(H100)
    argv = firststart.plan([*SERVE[:2], str(model), *SERVE[3:]], env, machine=lambda: H100, build=build)
    work = Path(argv[argv.index("--model") + 1])
    assert argv[-4:] == ["--backend", "trt", "--precision", "fp16"]
    assert work.parent == tmp_path / "cache" / "exports" and work != model
    assert build.calls == [(work, "fp16", str(tmp_path / "cache" / "trt"))]
    assert (work / "onnx" / "unet.onnx").is_symlink() and not (work / "manifest.json").is_symlink()
    assert tree_digest(model) == before  # the mount is read-only in the image: nothing may be written there

    again = firststart.prepare_engines(model, "fp16", H100, env, build=build)  # a restart on the same GPU
    assert again == work and len(build.calls) == 1

    other_gpu = FakeBuild(L40S)  # the volume moved to another GPU model: its engines do not fit
    assert firststart.prepare_engines(model, "fp16", L40S, env, build=other_gpu) == work
    assert len(other_gpu.calls) == 1
    assert read_manifest(work)["engines"]["fp16"]["compute_capability"] == "8.9"
    assert tree_digest(model) == before


def test_an_export_whose_engines_fit_is_served_as_it_is(model, tmp_path):
    FakeBuild(H100)(model, "fp16", {"LFTK_TRT_CACHE": "unused"})  # engines built on this GPU model before
    build = FakeBuild(H100)
    assert firststart.prepare_engines(model, "fp16", H100, {"LFTK_CACHE": str(tmp_path / "c")}, build=build) == model
    assert build.calls == [] and not (tmp_path / "c").exists()


def test_a_failed_build_stops_the_start(model, tmp_path):
    def broken(work, precision, env):
        raise LftkError("engine build failed (exit 1): lftk export WORK --no-onnx --trt --precision fp16 --out WORK")

    with pytest.raises(LftkError, match="engine build failed"):
        firststart.prepare_engines(model, "fp16", H100, {"LFTK_CACHE": str(tmp_path / "c")}, build=broken)
    with pytest.raises(LftkError, match="still unusable after the build"):  # a build that left no engines
        firststart.prepare_engines(model, "fp16", H100, {"LFTK_CACHE": str(tmp_path / "c")}, build=lambda *a: None)


def test_a_changed_export_is_refused_not_served(model, tmp_path):
    env = {"LFTK_CACHE": str(tmp_path / "cache")}
    firststart.prepare_engines(model, "fp16", H100, env, build=FakeBuild(H100))
    with open(model / "onnx" / "unet.onnx", "r+b") as fh:  # a graph edited after export, manifest unchanged
        fh.seek(100)
        fh.write(b"\0\0\0\0")
    with pytest.raises(LftkError, match="content differs from manifest.json"):
        firststart.prepare_engines(model, "fp16", H100, env, build=FakeBuild(H100))
    with pytest.raises(LftkError, match="not an export dir"):
        firststart.prepare_engines(tmp_path, "fp16", H100, env, build=FakeBuild(H100))


def test_the_real_export_command_writes_only_into_the_working_copy(model, tmp_path):
    """`lftk export WORK --no-onnx ... --out WORK` (the first start's command, with --check-trt standing
    in for --trt on CPU) rewrites the working copy's records, and then the ort backend runs from it."""
    from typer.testing import CliRunner

    from lftk.cli import app
    from lftk.deploy.infer import run_infer

    before = tree_digest(model)
    work = firststart.make_working_copy(model, tmp_path / "cache" / "exports" / "w")
    argv = firststart.export_argv(work, "fp16")
    argv[argv.index("--trt") : argv.index("--trt") + 3] = ["--check-trt"]  # same shape, no TensorRT needed
    result = CliRunner().invoke(app, argv[1:])
    assert result.exit_code == 0, result.output
    assert read_manifest(work)["trt_check"]["passed"] is True
    assert tree_digest(model) == before

    frame = tmp_path / "frame.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (90, 120, 200)).save(frame)
    summary = run_infer(work, frame, "stack the blocks", backend="ort", frames=1, steps=2, out=tmp_path / "out")
    assert summary["backend"] == "ort" and (tmp_path / "out" / "frame_001.png").is_file()


def test_imports_without_training_extras_or_torch():
    blocker = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('deepspeed', 'peft', 'bitsandbytes'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import lftk.deploy.firststart\n"
        "assert 'torch' not in sys.modules, 'firststart imports torch before it needs it'\n"
    )
    done = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
