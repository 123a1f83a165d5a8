"""`lftk bench` on the tiny export: the rows, their numbers, parity, refusals, --json and --log."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lftk.cli import app
from lftk.runtime.backends import OrtBackend
from lftk.deploy.bench import KEYS, format_table, run_bench
from lftk.errors import LftkError
from lftk.runtime.manifest import read_manifest, write_manifest
from lftk.export.parity import parity_image

TINY = {"frames": 3, "steps": 2, "warmup": 1, "repeats": 1, "threads": 1}  # 1 thread: torch stalls on a busy CPU


@pytest.fixture(scope="module")
def bench(tiny_export_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rows = run_bench(tiny_export_dir, ("torch", "ort", "trt"), json_path=out / "rows.json", log_path=out / "log.jsonl", **TINY)
    return rows, out


def _row(rows, backend, precision):
    (row,) = [r for r in rows if r["backend"] == backend and r["precision"] == precision]
    return row


def test_bench_times_torch_and_ort_and_checks_parity(bench):
    rows, _ = bench
    assert [(r["backend"], r["precision"]) for r in rows] == [("torch", "fp32"), ("ort", "fp32"), ("trt", "-")]
    for backend in ("torch", "ort"):
        row = _row(rows, backend, "fp32")
        assert row["status"] == "ok", row
        for key in ("ms_per_unet_step", "ms_per_frame", "frames_per_s", "batched_frames_per_s", "peak_mem_mb", "size_mb"):
            assert row[key] > 0, (backend, key, row[key])
    assert _row(rows, "torch", "fp32")["parity_psnr_db"] is None  # the reference
    assert _row(rows, "ort", "fp32")["parity_psnr_db"] >= 40.0


def test_the_stock_diffusers_pipeline_is_the_peer_row(tiny_export_dir):
    """The diffusers row: the stock pipeline on the export's weights, timed like the others; its frames
    match lftk's torch row (same scheduler, steps, guidance, seed); every row says its speed-up over it."""
    rows = run_bench(tiny_export_dir, ["torch", "diffusers", "ort"], **TINY)
    assert [(r["backend"], r["precision"]) for r in rows][:2] == [("torch", "fp32"), ("diffusers", "fp32")]
    peer = _row(rows, "diffusers", "fp32")
    assert peer["status"] == "ok", peer
    assert peer["ms_per_unet_step"] > 0 and peer["ms_per_frame"] > 0 and peer["providers"] == ["diffusers (cpu)"]
    assert peer["parity_psnr_db"] >= 40.0, peer
    assert peer["vs_diffusers"] == 1.0
    for r in rows:
        assert r["vs_diffusers"] == pytest.approx(peer["ms_per_frame"] / r["ms_per_frame"], rel=0.01)
    table = format_table(rows)
    assert "vs diffusers" in table.splitlines()[0] and re.search(r"^diffusers\s+fp32\s+ok", table, re.M)


def test_trt_row_says_why_it_did_not_run(bench):
    rows, _ = bench
    trt = _row(rows, "trt", "-")
    try:
        import tensorrt  # noqa: F401

        has_trt = True
    except ImportError:
        has_trt = False
    assert trt["status"].startswith("not available: ")
    assert ("the TensorRT Python package" in trt["status"]) == (not has_trt)
    assert trt["ms_per_unet_step"] is None and trt["parity_psnr_db"] is None


def test_json_and_log(bench, tiny_export_dir):
    rows, out = bench
    written = json.loads((out / "rows.json").read_text())
    assert len(written) == len(rows)
    assert all(set(KEYS) <= set(r) for r in written)
    (entry,) = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert entry["model"] == str(tiny_export_dir) and entry["rows"] == written
    assert {"cpu", "gpu", "lftk", "load_avg"} <= set(entry["machine"]) and entry["timestamp"]
    table = format_table(rows)
    assert table.splitlines()[0].split()[:3] == ["backend", "precision", "status"]
    assert "3 independent start frames in one Runner.predict call" in table


def test_ort_precision_is_checked_against_the_export(tiny_export_dir):
    assert OrtBackend(tiny_export_dir, precision="fp32").precision == "fp32"
    with pytest.raises(LftkError, match=r"no int8 ONNX graphs \(this export holds fp32\).*--precision int8"):
        OrtBackend(tiny_export_dir, precision="int8")  # never a silent fall back to the fp32 graphs


def test_ort_same_seed_same_batched_frames(tiny_export_dir):
    from lftk.runtime.runner import Runner

    runner = Runner.from_backend(OrtBackend(tiny_export_dir))
    starts = np.concatenate([parity_image(64, seed=k) for k in range(2)])
    a, b = (runner.predict(starts, "stack", steps=2, seed=3) for _ in range(2))
    assert np.array_equal(a, b)


def test_bench_refuses_bad_input_and_tampered_exports(tiny_export_dir, tiny_pipeline_dir, tmp_path):
    with pytest.raises(LftkError, match="unknown backend"):
        run_bench(tiny_export_dir, ["onnx"], **TINY)
    with pytest.raises(LftkError, match="--frames must be 1..16"):
        run_bench(tiny_export_dir, ["ort"], frames=17)
    tampered = tmp_path / "export"
    shutil.copytree(tiny_export_dir, tampered)
    graph = tampered / read_manifest(tampered)["components"]["unet"]["files"][0]["path"]
    graph.write_bytes(graph.read_bytes()[:-1] + b"\0")
    with pytest.raises(LftkError, match="content differs from manifest.json"):
        run_bench(tampered, ["ort"], **TINY)


def test_engines_for_another_gpu_are_refused_in_their_row(tiny_export_dir, tmp_path, monkeypatch):
    """An export whose engine record names another TensorRT/GPU: the trt row is refused, not run."""
    import lftk.deploy.bench.memory as bench_memory
    import lftk.runtime.trt_engine as trt_mod

    export = tmp_path / "export"
    shutil.copytree(tiny_export_dir, export)
    manifest = read_manifest(export)
    manifest["engines"] = {"fp16": {"tensorrt": "10.0.0", "compute_capability": "1.0", "gpu": "elsewhere", "components": {}}}
    write_manifest(export, manifest)
    here = {"tensorrt": "10.9.0", "cuda": True, "gpu": "here", "compute_capability": "8.9", "missing": []}
    monkeypatch.setattr(trt_mod, "machine", lambda: here)
    monkeypatch.setattr(bench_memory, "cuda_peak_reset", lambda: False)
    (row,) = run_bench(export, ["trt"], **TINY)
    assert row["precision"] == "fp16"
    assert row["status"].startswith("refused: ") and "built with TensorRT 10.0.0" in row["status"]
    assert "--no-onnx --trt --precision fp16" in row["status"]


def test_cli_bench(tiny_export_dir, tmp_path):
    threads_before = torch.get_num_threads()  # --threads is for the bench only
    out = tmp_path / "rows.json"
    result = CliRunner().invoke(
        app, ["bench", "--model", str(tiny_export_dir), "--backends", "ort,trt", "--frames", "2", "--steps", "1",
              "--repeats", "1", "--threads", "1", "--json", str(out)],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert [(r["backend"], r["status"][:3]) for r in written] == [("ort", "ok"), ("trt", "not")]
    assert written[0]["threads"] == {"torch": 1, "onnxruntime": 1} and torch.get_num_threads() == threads_before
    assert "batched frames/s" in result.output and f"rows -> {out}" in result.output
    assert not (tmp_path / "bench").exists()  # no log unless --log asks for one


def test_bench_on_a_pipeline_dir_times_torch_and_says_what_to_export(tiny_pipeline_dir, tiny_export_dir):
    """No export yet (a full-size model on a GPU): torch rows run at the asked size, ort and trt say why not."""
    rows = run_bench(tiny_pipeline_dir, ("torch", "ort", "trt"), resolution=32, **TINY)
    assert [(r["backend"], r["precision"]) for r in rows] == [("torch", "fp32"), ("ort", "-"), ("trt", "-")]
    torch_row = rows[0]
    assert torch_row["status"] == "ok" and torch_row["resolution"] == 32 and torch_row["ms_per_frame"] > 0
    for row in rows[1:]:
        assert row["status"].startswith("not available: ") and "lftk export" in row["status"], row
        assert row["ms_per_frame"] is None
    assert "32 px" in format_table(rows)
    with pytest.raises(LftkError, match="multiple of 8"):
        run_bench(tiny_pipeline_dir, ["torch"], resolution=30, **TINY)
    with pytest.raises(LftkError, match=r"built for 64 px.*--model .*pipeline"):
        run_bench(tiny_export_dir, ["ort"], resolution=128, **TINY)


@pytest.mark.parametrize("script", ["bench/gpu.sh", "bench/gpu_wheels.sh"])
def test_gpu_scripts_parse_and_name_only_real_bench_options(script):
    """The GPU session's scripts cannot be run here: check their syntax, and that every `--option` the
    bench line passes is one `lftk bench` takes (a renamed option would waste a lent machine)."""
    import re
    import subprocess

    path = Path(__file__).resolve().parent.parent / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    if "lftk bench" in text:
        from typer.main import get_command

        from lftk.cli import app

        bench = get_command(app).get_command(None, "bench")
        known = {opt for param in bench.params for opt in param.opts}
        line = text[text.index("lftk bench --model") :].split("\n\n")[0]
        used = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", line))
        assert used and used <= known, used - known


def test_gpu_script_passes_only_options_its_helpers_take():
    """Every `--option` gpu.sh gives bench/train_steps.py, diffusers_rollout.py and gpu_inventory.py is one
    of theirs (their argparse parsers, read by running --help)."""
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    text = (root / "bench" / "gpu.sh").read_text()
    for script in ("train_steps.py", "diffusers_rollout.py", "gpu_inventory.py"):
        calls = re.findall(rf'bench/{script}(.*?)(?:>|\|\||2>&1|$)', text.replace("\\\n", " "), flags=re.M)
        assert calls, f"gpu.sh does not call bench/{script}"
        helptext = subprocess.run([sys.executable, str(root / "bench" / script), "--help"], capture_output=True,
                                  text=True, check=True).stdout
        known = set(re.findall(r"--[a-z][a-z-]*", helptext))
        for call in calls:
            used = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", call))
            assert used <= known, f"{script}: {used - known} not among its options"


@pytest.mark.slow
def test_gpu_script_rehearses_on_cpu_with_tiny_sizes(tmp_path):
    """The whole checklist end to end on this CPU with the tiny preset: every step runs and writes its file."""
    import json
    import os
    import subprocess

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "out"
    env = {**os.environ, "PRESET": "tiny", "STEPS": "1", "FRAMES": "2", "RES": "64", "REPEATS": "1", "COMPILE": "0",
           "TRAIN_STEPS": "3", "TESTS": "0", "OUT": str(out), "WORK": str(tmp_path / "work"), "OMP_NUM_THREADS": "2",
           "TRAIN_OVERRIDES": "train.precision=fp32 train.optimizer=adamw train.resolution=64 train.gradient_checkpointing=false",
           "PYTHON": __import__("sys").executable}
    res = subprocess.run(["bash", "bench/gpu.sh"], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    inv = json.loads((out / "inventory.json").read_text())
    assert inv["packages"]["torch"]["importable"] and "deepspeed" in inv["packages"]
    assert json.loads((out / "diffusers-rollout.json").read_text())["frames"] == 2
    for recipe in ("stage2", "stage2-24gb"):
        row = json.loads((out / f"train-{recipe}.json").read_text())
        assert row["engine"] == "lftk engine (DeepSpeed)" and row["steps"] == 3 and row["dry_run_gib"] > 0, row
        assert row["samples_per_s"] > 0, row
    assert json.loads((out / "bench-tiny-64px-1steps.json").read_text())


def test_cli_bench_steps_list_and_guidance(tiny_export_dir, tmp_path):
    """--steps 1,2: a row per count (the few-step trade-off); --guidance 1 --image-guidance 1: one branch."""
    out = tmp_path / "rows.json"
    result = CliRunner().invoke(
        app, ["bench", "--model", str(tiny_export_dir), "--backends", "ort", "--frames", "2", "--steps", "1,2",
              "--guidance", "1", "--image-guidance", "1", "--repeats", "1", "--threads", "1", "--json", str(out)],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [(r["steps"], r["branches"], r["guidance"]) for r in rows] == [(1, 1, 1.0), (2, 1, 1.0)]
    assert all(r["status"] == "ok" for r in rows)
    assert "guidance 1 / image 1" in result.output and "1 guidance branch." in result.output
    header = next(line for line in result.output.splitlines() if line.startswith("backend")).split()
    assert header[:3] == ["backend", "precision", "steps"]
    bad = CliRunner().invoke(app, ["bench", "--model", str(tiny_export_dir), "--steps", "2,x"])
    assert isinstance(bad.exception, LftkError) and "--steps '2,x'" in str(bad.exception)  # exit 2 via lftk's main
