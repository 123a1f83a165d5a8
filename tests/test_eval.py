"""Metrics against scikit-image, the scoring loop, and `lftk eval` end to end on the tiny pipeline
(simulated pairs: motion, trajectory, zero-shot and rollout baselines, report, figures, --compare)."""

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


@pytest.fixture(scope="module")
def sim_pair_dir(tmp_path_factory):
    """Simulated pairs (states in episode.json): 3 episodes x 2 tasks, 24 frames, horizon 8, stride 8:
    4 test samples, 2 of them with a source episode long enough for a 2-step rollout."""
    pytest.importorskip("pybullet")
    from lftk.sim.generate import simulate

    root = tmp_path_factory.mktemp("simeval")
    simulate(root / "episodes", ["blocks_stack_easy", "block_handover"], episodes=3, frames=24, resolution=64,
             seed=5, workers=1)
    make_pairs(root / "episodes", root / "pairs", horizon=8, stride=8)
    return root / "pairs"


def test_metrics_match_scikit_image_on_simulated_frames(sim_pair_dir):
    for pair in PairSet(sim_pair_dir, "test"):
        for res in (None, 32):  # as rendered, and resized as the evaluator loads them
            a, b = load_rgb(pair.current, res), load_rgb(pair.future, res)
            assert abs(ssim(b, a) - _skimage_ssim(a, b)) < 1e-6
            assert abs(psnr_raw(b, a) - peak_signal_noise_ratio(a, b, data_range=255)) < 1e-6
            assert abs(mse(b, a) - mean_squared_error(a, b)) < 1e-6 * max(1.0, mean_squared_error(a, b))


def _settings(**kw) -> EvalSettings:
    base = dict(resolution=32, prompt_template="{instruction}", steps=1, guidance=1.0, image_guidance=1.0,
                seed=0, batch_size=3, device="cpu")
    return EvalSettings(**{**base, **kw})


def test_prediction_equal_to_input_scores_exactly_as_the_copy_baseline(pair_dir, sim_pair_dir):
    identity = lambda items: [it.current.copy() for it in items]  # noqa: E731
    for pairs, res in ((list(PairSet(pair_dir, "train")) + list(PairSet(pair_dir, "val")), 32),
                       (list(PairSet(sim_pair_dir, "test")), 64)):
        rows, shown = score(pairs, {"model": identity, "copy": copy_predictor}, _settings(resolution=res), show=[0, 3])
        assert len(rows) == len(pairs) and len(shown) == 2
        for row in rows:
            assert row["metrics"]["model"] == row["metrics"]["copy"]  # every metric, motion and trajectory too
            for d in row["positions"].values():
                assert d["err_px"].get("model") == d["err_px"].get("copy")
        truth = load_rgb(pairs[0].future, res)
        copy = rows[0]["metrics"]["copy"]
        assert {k: copy[k] for k in ("ssim", "psnr", "mse", "psnr_capped")} == frame_metrics(load_rgb(pairs[0].current, res), truth)
    # On simulated pairs the motion and trajectory figures exist (not n/a) for the copy baseline.
    assert all(r["metrics"]["copy"]["motion_psnr"] is not None for r in rows)
    assert any(r["metrics"]["copy"]["ee_err_px"] is not None for r in rows)
    assert any(r["metrics"]["copy"]["obj_err_px"] is not None for r in rows)


def test_prediction_equal_to_truth_is_capped_and_the_report_says_so(sim_pair_dir):
    from lftk.eval.report import build_sections, render_markdown

    pairs = list(PairSet(sim_pair_dir, "test"))
    oracle = lambda items: [load_rgb(it.pair.future, 64) for it in items]  # noqa: E731
    rows, _ = score(pairs, {"model": oracle, "copy": copy_predictor}, _settings(resolution=64))
    for row in rows:
        m = row["metrics"]["model"]
        assert m["psnr"] == PSNR_CAP_DB and m["psnr_capped"] and m["ssim"] == 1.0 and m["mse"] == 0.0
        assert m["motion_psnr"] == PSNR_CAP_DB and m["motion_psnr_capped"] and m["motion_ssim"] == 1.0
        assert m["obj_err_px"] in (0.0, None) and m["ee_err_px"] == 0.0
    report = {
        "model": "oracle", "data": str(sim_pair_dir), "split": "test", "n_samples": len(rows), "methods": ["model", "copy"],
        "settings": {"resolution": 64, "steps": 1, "guidance": 1.0, "image_guidance": 1.0, "seed": 0,
                     "motion_threshold": 24, "motion_dilation_px": 2},
        "unavailable": {}, "rows": rows, **build_sections(rows, ["model", "copy"], None),
    }
    assert report["summary"]["model"]["psnr"]["mean"] == PSNR_CAP_DB
    md = render_markdown(report)
    assert f"counted as {PSNR_CAP_DB:g} dB (capped samples: model {len(rows)})" in md
    json.dumps(report, allow_nan=False)  # finite everywhere


def test_baseline_names_are_checked():
    assert check_baselines(("copy", "copy")) == ["copy"]
    assert check_baselines("copy, zero-shot,rollout") == ["copy", "zero-shot", "rollout"]
    with pytest.raises(LftkError, match="unknown baseline 'blur'.*copy, zero-shot, rollout"):
        check_baselines(["blur"])
    with pytest.raises(LftkError, match="the model is always evaluated"):
        check_baselines(["model"])


def test_evaluate_rejects_bad_input_before_loading_the_model(pair_dir, tmp_path):
    no_model = tmp_path / "no-model"  # never loaded: the argument errors come first
    with pytest.raises(LftkError, match="unknown baseline"):
        evaluate(no_model, pair_dir, tmp_path / "out", baselines=("nope",))
    with pytest.raises(LftkError, match="rollout_steps must be >= 2"):
        evaluate(no_model, pair_dir, tmp_path / "out", rollout_steps=1)
    with pytest.raises(LftkError, match="no split 'dev'"):
        evaluate(no_model, pair_dir, tmp_path / "out", split="dev")
    with pytest.raises(LftkError, match="no such model dir"):
        evaluate(no_model, pair_dir, tmp_path / "out")


@pytest.fixture(scope="module")
def tuned_dir(tiny_pipeline_dir, tmp_path_factory):
    """The tiny pipeline posing as a fine-tuned model whose base is itself: zero-shot must equal model."""
    import shutil

    from lftk.model.base import write_meta

    out = tmp_path_factory.mktemp("tuned") / "pipeline"
    shutil.copytree(tiny_pipeline_dir, out)
    write_meta(out, {"base": str(tiny_pipeline_dir)})
    return out


def test_eval_cli_on_simulated_pairs_writes_every_artifact(tuned_dir, sim_pair_dir, tmp_path):
    from typer.testing import CliRunner

    from lftk.cli import app

    out = tmp_path / "eval"
    args = ["eval", str(tuned_dir), "--data", str(sim_pair_dir), "--out", str(out), "--steps", "2", "--batch-size", "2"]
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "zero-shot" in result.output and "report.md" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "horizon.png", "report.json", "report.md", "rollout.gif"]
    report = json.loads((out / "report.json").read_text())
    test = PairSet(sim_pair_dir, "test")
    assert report["n_samples"] == len(test) == 4 and report["n_episodes"] == 2
    assert report["methods"] == ["model", "copy", "zero-shot"]
    assert set(report["unavailable"]) <= {"lpips"}
    rows = {r["sample"]: r for r in report["rows"]}
    for row in rows.values():
        # Same weights, same per-sample seeds: the "base" scores exactly as the model.
        assert row["metrics"]["zero-shot"] == row["metrics"]["model"]
        assert row["na"].get("trajectory") is None
    # Rollout: step 1 is the model itself on the same sample and seed; step 2 is scored against t+2Δ.
    ro = report["rollout"]
    assert ro["n_samples"] == ro["eligible"] == 2 and set(ro["per_step"]) == {"1", "2"}
    assert ro["per_step"]["2"]["horizon"] == 16
    for r in ro["rows"]:
        if r["step"] == 1:
            assert r["metrics"]["model"]["mse"] == pytest.approx(rows[r["sample"]]["metrics"]["model"]["mse"], rel=1e-4)
            assert r["metrics"]["copy"] == rows[r["sample"]]["metrics"]["copy"]
    # The summary is the mean of the rows, and intervals come from 2 episodes.
    s = report["summary"]["copy"]["psnr"]
    assert s["mean"] == pytest.approx(np.mean([r["metrics"]["copy"]["psnr"] for r in rows.values()]))
    assert s["episodes"] == 2 and s["ci"][0] <= s["mean"] <= s["ci"][1]
    md = (out / "report.md").read_text()
    for heading in ("## Whole frame", "## Where the scene moves", "## Where things end up", "## Per task",
                    "## Per horizon", "## Rollout", "## Per object"):
        assert heading in md
    assert "| copy |" in md and "lpips" in md
    with Image.open(out / "grid.png") as grid:
        assert grid.width >= 4 * 128  # input | truth | prediction | abs-diff
    with Image.open(out / "rollout.gif") as gif:
        assert gif.n_frames == 3  # t, t+Δ, t+2Δ

    # --compare of a report with itself: no difference, and the interval says so.
    result = CliRunner().invoke(app, ["eval", "--compare", str(out), str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "paired over 4 samples" in result.output and "PSNR in motion" in result.output


def test_evaluate_lists_an_unloadable_base_and_goes_on(tiny_pipeline_dir, pair_dir, tmp_path):
    import shutil

    from lftk.model.base import write_meta

    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, model)
    write_meta(model, {"base": str(tmp_path / "gone-base")})
    report = evaluate(model, pair_dir, tmp_path / "out", steps=1, max_samples=1, baselines=("copy", "zero-shot", "rollout"))
    assert report["methods"] == ["model", "copy"]
    assert "not found" in report["unavailable"]["zero-shot"]
    # Fake episodes carry no simulator states: trajectory metrics are n/a with the reason.
    assert "no simulator states" in report["rows"][0]["na"]["trajectory"]
    assert report["summary"]["model"]["obj_err_px"]["mean"] is None
    md = (tmp_path / "out" / "report.md").read_text()
    assert "zero-shot: base model dir" in md and "object error" not in md.split("## Notes")[0]

    # Per-sample seeds: one sample evaluated alone gets the prediction it got inside a batch.
    both = evaluate(model, pair_dir, tmp_path / "both", steps=1, baselines=("copy",), batch_size=2)
    assert both["rows"][0]["sample"] == report["rows"][0]["sample"]
    # (MSE, not SSIM: the random tiny model's noise scores similar SSIM whatever its seed.)
    assert both["rows"][0]["metrics"]["model"]["mse"] == pytest.approx(report["rows"][0]["metrics"]["model"]["mse"], rel=1e-4)
