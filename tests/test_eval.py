"""Metrics against scikit-image, the scoring loop, and `evaluate` end to end on the tiny pipeline."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

from lftk.data.images import load_rgb
from lftk.data.pairs import make_pairs
from lftk.data.pairset import PairSet
from lftk.errors import LftkError
from lftk.eval.evaluate import evaluate, score
from lftk.eval.methods import EvalSettings, check_baselines, copy_predictor
from lftk.eval.metrics import PSNR_CAP_DB, frame_metrics, mse, psnr, psnr_raw, ssim
from test_pairs import write_fake_episodes  # the same fake episodes as the pair tests

RNG = np.random.default_rng(1234)


def _skimage_ssim(a, b):
    r = 255 if a.dtype == np.uint8 else 1.0
    return structural_similarity(
        a, b, channel_axis=-1 if a.ndim == 3 else None, data_range=r,
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    )


def _structured(h: int, w: int) -> np.ndarray:
    """A scene-like frame: smooth gradients, a hard-edged block, a thin line."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / (w - 1), yy * 255 / (h - 1), 128 + 100 * np.sin(xx / 3.0)], axis=-1)
    img[h // 4 : h // 2, w // 3 : w // 2] = (20, 200, 60)
    img[h - 3, :] = 255
    return img.round().clip(0, 255).astype(np.uint8)


def _frame_pairs():
    shapes = [(32, 32, 3), (64, 64, 3), (40, 57, 3), (11, 11, 3), (48, 48)]
    for shape in shapes:  # random frames vs a noisy copy
        a = RNG.integers(0, 256, shape, dtype=np.uint8)
        b = np.clip(a.astype(int) + RNG.integers(-40, 41, shape), 0, 255).astype(np.uint8)
        yield f"random{shape}", a, b
    s = _structured(48, 64)
    yield "structured-shift", s, np.roll(s, 3, axis=1)
    yield "structured-dark", s, (s // 2).astype(np.uint8)
    yield "structured-vs-random", s, RNG.integers(0, 256, s.shape, dtype=np.uint8)
    yield "float", s / 255.0, np.roll(s, 2, axis=0) / 255.0


@pytest.mark.parametrize(("name", "a", "b"), list(_frame_pairs()), ids=lambda v: v if isinstance(v, str) else "")
def test_metrics_match_scikit_image(name, a, b):
    r = 255 if a.dtype == np.uint8 else 1.0
    assert abs(ssim(b, a) - _skimage_ssim(a, b)) < 1e-6
    assert abs(psnr_raw(b, a) - peak_signal_noise_ratio(a, b, data_range=r)) < 1e-6
    assert abs(mse(b, a) - mean_squared_error(a, b)) < 1e-6 * max(1.0, mean_squared_error(a, b))


def test_identical_frames_give_capped_psnr_and_unit_ssim():
    a = _structured(32, 32)
    assert math.isinf(psnr_raw(a, a.copy()))
    assert psnr(a, a.copy()) == (PSNR_CAP_DB, True)
    row = frame_metrics(a, a.copy())
    assert row == {"ssim": 1.0, "psnr": PSNR_CAP_DB, "mse": 0.0, "psnr_capped": True}
    assert frame_metrics(a, 255 - a)["psnr_capped"] is False


def test_metric_inputs_are_checked():
    a = _structured(32, 32)
    with pytest.raises(TypeError, match="must both be uint8"):
        ssim(a, a / 255.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        psnr(a.astype(float), a.astype(float))
    with pytest.raises(ValueError, match="shape"):
        mse(a, a[:16])
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a[:8, :8], a[:8, :8])


# ------------------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    write_fake_episodes(root / "episodes", episodes=3, frames=30)
    # 3 episodes per task -> 1 per split; stride 20 -> 1 pair per episode: 2 test samples, one per task.
    make_pairs(root / "episodes", root / "pairs", horizon=10, stride=20)
    return root / "pairs"


def _settings(**kw) -> EvalSettings:
    base = dict(resolution=32, prompt_template="{instruction}", steps=1, guidance=1.0, image_guidance=1.0,
                seed=0, batch_size=3, device="cpu")
    return EvalSettings(**{**base, **kw})


def test_prediction_equal_to_input_scores_exactly_as_the_copy_baseline(pair_dir):
    pairs = list(PairSet(pair_dir, "train")) + list(PairSet(pair_dir, "val"))
    identity = lambda items: [it.current.copy() for it in items]  # noqa: E731
    rows, shown = score(pairs, {"model": identity, "copy": copy_predictor}, _settings(), show=[0, 3])
    assert len(rows) == len(pairs) and len(shown) == 2
    for row in rows:
        assert row["metrics"]["model"] == row["metrics"]["copy"]
    truth = load_rgb(pairs[0].future, 32)
    assert rows[0]["metrics"]["copy"] == frame_metrics(load_rgb(pairs[0].current, 32), truth)


def test_baseline_names_are_checked():
    assert check_baselines(("copy", "copy")) == ["copy"]
    assert check_baselines("copy") == ["copy"]
    with pytest.raises(LftkError, match="unknown baseline 'blur'.*copy, zero-shot"):
        check_baselines(["blur"])
    with pytest.raises(LftkError, match="'zero-shot'.*not implemented"):
        check_baselines(["zero-shot"])


def test_evaluate_rejects_bad_input_before_loading_the_model(pair_dir, tmp_path):
    no_model = tmp_path / "no-model"  # never loaded: the argument errors come first
    with pytest.raises(LftkError, match="unknown baseline"):
        evaluate(no_model, pair_dir, tmp_path / "out", baselines=("nope",))
    with pytest.raises(LftkError, match="no split 'dev'"):
        evaluate(no_model, pair_dir, tmp_path / "out", split="dev")
    with pytest.raises(LftkError, match="no such model dir"):
        evaluate(no_model, pair_dir, tmp_path / "out")


def test_evaluate_tiny_pipeline_writes_report_and_grid(tiny_pipeline_dir, pair_dir, tmp_path):
    out = tmp_path / "eval"
    report = evaluate(tiny_pipeline_dir, pair_dir, out, steps=2, seed=0, batch_size=2)

    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == report
    test = PairSet(pair_dir, "test")
    assert report["n_samples"] == len(test) == 2
    assert report["methods"] == ["model", "copy"]
    assert report["settings"]["resolution"] == 64 and report["settings"]["steps"] == 2
    assert set(report["per_task"]) == {"block_hammer_beat", "block_handover"}
    for row in report["rows"]:
        for method in ("model", "copy"):
            assert set(row["metrics"][method]) == {"ssim", "psnr", "mse", "psnr_capped"}
    # The copy rows are the metrics of (input, truth) at the model's resolution, nothing else.
    first = test[0]
    want = frame_metrics(load_rgb(first.current, 64), load_rgb(first.future, 64))
    assert report["rows"][0]["sample"] == first.name and report["rows"][0]["metrics"]["copy"] == want
    means = report["means"]["copy"]
    assert means["ssim"] == pytest.approx(np.mean([r["metrics"]["copy"]["ssim"] for r in report["rows"]]))

    with Image.open(out / "grid.png") as grid:
        assert grid.format == "PNG" and grid.width >= 3 * 128 and grid.height >= 2 * 128
    md = (out / "report.md").read_text()
    assert "| model |" in md and "| copy |" in md and "block_handover" in md

    # Per-sample seeds: one sample evaluated alone gets the prediction it got inside a batch.
    alone = evaluate(tiny_pipeline_dir, pair_dir, tmp_path / "alone", steps=2, seed=0, max_samples=1, batch_size=1)
    assert alone["rows"][0]["sample"] == first.name
    in_batch = report["rows"][0]["metrics"]["model"]
    # (MSE, not SSIM: the random tiny model's noise scores similar SSIM whatever its seed.)
    assert alone["rows"][0]["metrics"]["model"]["mse"] == pytest.approx(in_batch["mse"], rel=1e-4)
