"""`lftk eval --backend`: the model scored through the runner, graphs and engines that infer and serve run."""

from __future__ import annotations

import numpy as np
import pytest

from lftk.data.images import load_rgb
from lftk.data.pairset import PairSet
from lftk.errors import LftkError
from lftk.eval.evaluate import _setup, evaluate, score
from lftk.eval.methods import MODEL_METHOD, sample_seed
from lftk.eval.metrics import psnr_db


def test_a_frame_of_eval_on_ort_is_the_frame_infer_makes(tiny_export_dir, tiny_pairs_dir, tmp_path):
    from lftk.deploy.infer import run_infer

    _, _, settings, methods, _, _ = _setup(tiny_export_dir, "cpu", ["copy"], {"steps": 2}, backend="ort",
                                           seed=0, batch_size=2)
    assert (settings.backend, settings.precision) == ("ort", "fp32")
    pairs = [PairSet(tiny_pairs_dir, "test")[i] for i in range(2)]
    preds: dict = {}
    score(pairs, {MODEL_METHOD: methods[MODEL_METHOD]}, settings, quiet=True, keep=preds)
    for pair in pairs:  # batched in eval, one at a time in infer: per-sample seeds make them the same frame
        out = tmp_path / pair.name
        run_infer(tiny_export_dir, pair.current, pair.instruction, backend="ort", frames=1, steps=2,
                  seed=sample_seed(0, pair.name), out=out)
        infer_frame = load_rgb(out / "frame_001.png", 64)
        assert psnr_db(preds[pair.name], infer_frame) >= 40.0
    other = run_infer(tiny_export_dir, pairs[0].current, pairs[0].instruction, backend="ort", frames=1, steps=2,
                      seed=1, out=tmp_path / "other")
    assert other["frames"] == 1
    assert psnr_db(preds[pairs[0].name], load_rgb(tmp_path / "other" / "frame_001.png", 64)) < 40.0  # seeds matter


def test_eval_on_the_torch_runner_matches_the_pipeline_and_says_what_ran(tiny_pipeline_dir, tiny_pairs_dir, tmp_path):
    pipe = evaluate(tiny_pipeline_dir, tiny_pairs_dir, tmp_path / "pipe", baselines=["copy"], steps=2)
    runner = evaluate(tiny_pipeline_dir, tiny_pairs_dir, tmp_path / "torch", baselines=["copy"], steps=2, backend="torch")
    assert pipe["settings"]["backend"] == "diffusers pipeline" and runner["settings"]["backend"] == "torch"
    a = [r["metrics"]["model"]["psnr"] for r in pipe["rows"]]
    b = [r["metrics"]["model"]["psnr"] for r in runner["rows"]]
    assert np.allclose(a, b, atol=0.05), (a, b)  # the same sampler step for step; float rounding aside
    assert "on torch (fp32); 2 steps" in (tmp_path / "torch" / "report.md").read_text()


def test_eval_backend_errors_name_what_is_wrong(tiny_pipeline_dir, tiny_pairs_dir, tmp_path):
    with pytest.raises(LftkError, match="the ort backend runs exported graphs"):
        evaluate(tiny_pipeline_dir, tiny_pairs_dir, tmp_path / "a", baselines=["copy"], steps=1, backend="ort")
    with pytest.raises(LftkError, match="--precision picks the graphs"):
        evaluate(tiny_pipeline_dir, tiny_pairs_dir, tmp_path / "b", baselines=["copy"], steps=1, precision="int8")
    with pytest.raises(LftkError, match="unknown backend"):
        evaluate(tiny_pipeline_dir, tiny_pairs_dir, tmp_path / "c", baselines=["copy"], steps=1, backend="onnx")
