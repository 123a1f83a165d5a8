"""Motion-masked metrics against scikit-image, the episode bootstrap, --compare, LPIPS availability,
and the val metrics the training loop logs."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from lftk.eval.compare import compare_reports, format_comparison
from lftk.eval.metrics import PSNR_CAP_DB, SSIM_RADIUS
from lftk.eval.motion import MOTION_THRESHOLD, dilation_radius, masked_metrics, motion_mask
from lftk.eval.stats import Bootstrap, paired_difference

RNG = np.random.default_rng(7)


def _scene(block_at: tuple[int, int], side: int = 64) -> np.ndarray:
    frame = np.full((side, side, 3), (165, 134, 112), np.uint8)
    frame += RNG.integers(0, 4, frame.shape, dtype=np.uint8)  # JPEG-like jitter, far below the threshold
    r, c = block_at
    frame[r : r + 6, c : c + 6] = (230, 40, 35)
    return frame


def test_motion_mask_covers_what_moved_and_nothing_else():
    current, truth = _scene((20, 20)), _scene((20, 30))
    mask = motion_mask(current, truth)
    d = dilation_radius(64)
    assert d == 2
    assert mask[20:26, 20:26].all() and mask[20:26, 30:36].all()  # where it was and where it went
    assert mask[20 - d, 20] and not mask[20 - d - 1, 20]  # dilated by exactly d px
    assert mask.sum() < 0.1 * mask.size  # the jittered table is not motion
    assert not motion_mask(current, current).any()
    assert not motion_mask(current, np.clip(current.astype(int) + MOTION_THRESHOLD, 0, 255).astype(np.uint8)).any()


def test_masked_metrics_agree_with_scikit_image_on_the_masked_pixels():
    current, truth = _scene((20, 20)), _scene((24, 36))
    pred = _scene((22, 26))
    mask = motion_mask(current, truth)
    got = masked_metrics(pred, truth, mask)
    assert got["motion_psnr"] == pytest.approx(peak_signal_noise_ratio(truth[mask], pred[mask], data_range=255), abs=1e-6)
    _, full = structural_similarity(truth, pred, channel_axis=-1, data_range=255, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, full=True)
    r = SSIM_RADIUS
    inner = np.zeros_like(mask)
    inner[r:-r, r:-r] = mask[r:-r, r:-r]
    assert got["motion_ssim"] == pytest.approx(full[inner].mean(), abs=1e-6)
    # Whole-frame figures of the same prediction hide the error that the mask shows.
    assert got["motion_psnr"] < peak_signal_noise_ratio(truth, pred, data_range=255) - 5

    exact = masked_metrics(truth, truth, mask)
    assert exact["motion_psnr"] == PSNR_CAP_DB and exact["motion_psnr_capped"] and exact["motion_ssim"] == 1.0
    none = masked_metrics(pred, truth, np.zeros_like(mask))
    assert none == {"motion_ssim": None, "motion_psnr": None, "motion_mse": None, "motion_psnr_capped": False}
    edge = np.zeros_like(mask)
    edge[0, :] = True  # motion only where SSIM's window overhangs: PSNR yes, SSIM n/a
    assert masked_metrics(pred, truth, edge)["motion_ssim"] is None


def test_bootstrap_resamples_episodes():
    keys = ["a"] * 10 + ["b"] * 10 + ["c"] * 10
    values = [1.0] * 10 + [2.0] * 10 + [3.0] * 10
    boot = Bootstrap(keys)
    s = boot.mean_ci(values, keys)
    assert s["mean"] == 2.0 and s["n"] == 30 and s["episodes"] == 3
    lo, hi = s["ci"]
    assert 1.0 <= lo < 2.0 < hi <= 3.0
    assert Bootstrap(keys).mean_ci(values, keys) == s  # seeded
    # One episode: nothing to resample, no interval rather than a zero-width one.
    assert boot.mean_ci([1.0, 2.0], ["a", "a"])["ci"] is None
    assert boot.mean_ci([None, None], ["a", "b"]) == {"mean": None, "ci": None, "n": 0, "episodes": 0}
    # Samples within an episode are not independent: many near-copies do not narrow the interval.
    many = Bootstrap(["a"] * 1000 + ["b"] * 1000).mean_ci([1.0] * 1000 + [3.0] * 1000, ["a"] * 1000 + ["b"] * 1000)
    assert many["ci"][0] <= 1.5 and many["ci"][1] >= 2.5


def test_paired_difference_sees_a_consistent_gain():
    keys = [f"ep{i % 5}" for i in range(40)]
    a = {f"s{i}": (float(RNG.normal(20, 3)), keys[i]) for i in range(40)}
    b = {s: (v + 0.5, k) for s, (v, k) in a.items()}  # B is 0.5 better on every sample
    d = paired_difference(a, b, Bootstrap(keys))
    assert d["mean"] == pytest.approx(0.5) and d["excludes_zero"] is True
    same = paired_difference(a, a, Bootstrap(keys))
    assert same["mean"] == 0.0 and same["excludes_zero"] is False


def _report(path, rows, methods=("model",)):
    import json

    from lftk.eval.report import build_sections

    report = {"model": str(path), "methods": list(methods), "rows": rows, **build_sections(rows, list(methods), None)}
    path.mkdir()
    (path / "report.json").write_text(json.dumps(report))
    return path


def _rows(offset: float, names):
    return [
        {"sample": n, "task": "t", "episode": f"episode{i % 4}", "positions": {},
         "metrics": {"model": {"psnr": 20.0 + offset + (i % 3), "obj_err_px": 5.0 - offset, "ssim": None}}}
        for i, n in enumerate(names)
    ]


def test_compare_two_reports(tmp_path):
    names = [f"s{i}" for i in range(16)]
    a = _report(tmp_path / "a", _rows(0.0, names))
    b = _report(tmp_path / "b", _rows(1.0, names))
    cmp = compare_reports(a, b)
    assert cmp["paired"] and cmp["n_common"] == 16
    by = {r["metric"]: r for r in cmp["rows"]}
    assert set(by) == {"psnr", "obj_err_px"}  # a metric with no values is left out
    assert by["psnr"]["diff"]["mean"] == pytest.approx(1.0) and by["psnr"]["diff"]["excludes_zero"]
    text = format_comparison(cmp)
    psnr_line = next(line for line in text.splitlines() if line.startswith("PSNR"))
    assert "+1.00" in psnr_line and "yes" in psnr_line and psnr_line.rstrip().endswith("B")
    obj_line = next(line for line in text.splitlines() if line.startswith("object error"))
    assert obj_line.rstrip().endswith("B")  # lower error is better

    c = _report(tmp_path / "c", _rows(1.0, [f"other{i}" for i in range(16)]))
    unpaired = compare_reports(a, c)
    assert not unpaired["paired"] and "unpaired" in format_comparison(unpaired)
    assert {r["metric"]: r for r in unpaired["rows"]}["psnr"]["diff"]["mean"] == pytest.approx(1.0)


def test_compare_errors_are_user_errors(tmp_path):
    from typer.testing import CliRunner

    from lftk.cli import app
    from lftk.errors import LftkError

    with pytest.raises(LftkError, match="no report.json"):
        compare_reports(tmp_path, tmp_path)
    result = CliRunner().invoke(app, ["eval", "some-model", "--compare", str(tmp_path), str(tmp_path)])
    assert result.exit_code != 0 and "give no MODEL" in str(result.exception)
    result = CliRunner().invoke(app, ["eval", "some-model"])
    assert "needs MODEL and --data" in str(result.exception)


def test_lpips_is_listed_with_the_reason_when_it_cannot_run():
    import importlib.util

    from lftk.eval.perceptual import load_lpips, lpips_status

    ok, why = lpips_status()
    if importlib.util.find_spec("lpips") is None:
        assert not ok and "lpips package is not installed" in why
        assert load_lpips() == (None, why)
    else:
        assert ok or why  # installed: either it runs or it says what is missing


@pytest.fixture(scope="module")
def val_pairs(tmp_path_factory):
    pytest.importorskip("pybullet")
    from lftk.data.pairs import make_pairs
    from lftk.sim.generate import simulate

    root = tmp_path_factory.mktemp("valpairs")
    simulate(root / "episodes", ["blocks_stack_easy"], episodes=3, frames=20, resolution=64, seed=9, workers=1)
    make_pairs(root / "episodes", root / "pairs", horizon=8, stride=4)
    return root / "pairs"


def test_val_metrics_are_fixed_and_leave_the_unet_as_it_was(tiny_pipeline_dir, val_pairs, tmp_path):
    from lftk.data.pairset import PairSet
    from lftk.eval.val import TensorBoardLog, plot_val_metrics, val_metrics
    from lftk.model.base import load_pipeline

    pipe = load_pipeline(tiny_pipeline_dir)
    pipe.unet.train()
    pairs = PairSet(val_pairs, "val")
    first = val_metrics(pipe, pairs, resolution=64, max_samples=2, steps=1, with_copy=True)
    assert pipe.unet.training
    assert first["val_n"] == 2
    for key in ("val_ssim", "val_psnr", "val_motion_psnr", "val_copy_psnr", "val_copy_ee_err_px"):
        assert key in first, sorted(first)
    assert first == val_metrics(pipe, pairs, resolution=64, max_samples=2, steps=1, with_copy=True)  # same subset, same noise
    rows = [{"step": 10, **first}, {"step": 20, **first}]
    assert plot_val_metrics(rows, tmp_path / "val_metrics.png").is_file()
    tb = TensorBoardLog(tmp_path)
    tb.log(10, first)  # a no-op without the tensorboard package
    tb.close()
