"""Post-processing of predicted frames: colour balance to the input, unsharp mask, and their rows in eval."""

from __future__ import annotations

import numpy as np
import pytest

from lftk.errors import LftkError
from lftk.eval.evaluate import evaluate
from lftk.model.postprocess import color_balance, make_postprocess, parse_steps, unsharp_mask


def _frames(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(40, 200, 64, dtype=np.float32)[None, :, None] * np.ones((64, 1, 3), np.float32)
    return np.clip(base + rng.normal(0, 8, (2, 64, 64, 3)), 0, 255).astype(np.uint8)  # (2, 64, 64, 3)


def test_color_balance_removes_a_cast_and_keeps_structure():
    current = _frames()
    cast = np.clip(current.astype(np.int16) * [1.0, 0.8, 0.6] + [30, 0, -10], 0, 255).astype(np.uint8)
    out = color_balance(cast, current)
    assert out.dtype == np.uint8 and out.shape == cast.shape
    err_before = np.abs(cast.astype(float).mean((1, 2)) - current.astype(float).mean((1, 2))).max()
    err_after = np.abs(out.astype(float).mean((1, 2)) - current.astype(float).mean((1, 2))).max()
    assert err_before > 20 and err_after < 1.5
    # Per channel an affine map: the ordering of pixel values (the structure) is kept.
    a, b = cast[0, ..., 2].ravel().astype(int), out[0, ..., 2].ravel().astype(int)
    assert np.all(np.diff(b[np.argsort(a, kind="stable")]) >= -1)


def test_color_balance_does_not_stretch_a_changed_scene_without_bound():
    current = _frames()
    flat = np.full_like(current, 128)  # no spread at all: matching the std exactly would blow up noise
    flat[:, :2] = 130
    out = color_balance(flat, current)
    assert out.astype(float).std() <= 2.0 * flat.astype(float).std() + 1


def test_unsharp_mask_adds_contrast_at_edges_only():
    img = np.zeros((1, 32, 32, 3), np.uint8)
    img[:, :, 16:] = 200
    img[:, :, 15] = 100  # a soft edge
    out = unsharp_mask(img)
    assert out[0, 5, 16, 0] > 210  # overshoot on the bright side of the edge: a steeper edge
    assert np.array_equal(out[:, :, :10], img[:, :, :10]) and np.array_equal(out[:, :, 20:], img[:, :, 20:])


def test_steps_parse_and_chain():
    assert parse_steps("color, sharpen") == ("color", "sharpen") and parse_steps(None) == () and parse_steps("") == ()
    with pytest.raises(LftkError, match="unknown post-processing colour"):
        parse_steps("colour")
    with pytest.raises(LftkError, match="twice"):
        parse_steps("color,color")
    assert make_postprocess("") is None
    pred, cur = _frames(1), _frames(2)
    chained = make_postprocess("color,sharpen")
    assert np.array_equal(chained(pred, cur), unsharp_mask(color_balance(pred, cur)))
    assert chained.steps == ("color", "sharpen")


def test_eval_scores_postprocessed_rows_from_the_same_predictions(tiny_pipeline_dir, tiny_pairs_dir, tmp_path, monkeypatch):
    calls = []
    import lftk.eval.methods as methods

    real = methods.PipelinePredictor.__call__
    monkeypatch.setattr(methods.PipelinePredictor, "__call__", lambda self, items: calls.append(len(items)) or real(self, items))
    report = evaluate(
        tiny_pipeline_dir, tiny_pairs_dir, tmp_path / "eval", steps=1, max_samples=2, baselines=("copy",),
        batch_size=2, postprocess=("color", "sharpen"),
    )
    assert report["methods"] == ["model", "model+color", "model+sharpen", "model+color+sharpen", "copy"]
    assert calls == [2], "post-processed rows must reuse the model's frames, not sample again"
    assert report["settings"]["postprocess"] == ["color", "sharpen"]
    row = report["rows"][0]["metrics"]
    assert row["model+color"]["mse"] != row["model"]["mse"]
    assert "| model+color |" in (tmp_path / "eval" / "report.md").read_text()
    with pytest.raises(LftkError, match="unknown post-processing"):
        evaluate(tiny_pipeline_dir, tiny_pairs_dir, tmp_path / "x", steps=1, postprocess=("blur",))
