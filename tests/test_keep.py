"""`keep`: the current frame's own pixels where the model predicts no change, alike in eval and the runner."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lftk.eval.methods import EvalItem, EvalSettings, PipelinePredictor, redraw
from lftk.export.parity import parity_image
from lftk.runtime.pixels import images_to_model, model_to_unit, unit_to_uint8
from lftk.runtime.sampler import make_scheduler
from lftk.runtime.keep import keep_unchanged


def test_keep_takes_the_current_frame_where_the_prediction_matches_the_redrawn_one():
    current = np.full((1, 16, 16, 3), 100, np.uint8)
    current[0, 2:4, 2:4] = (250, 200, 0)  # a small yellow block the VAE blurs away
    redrawn = np.full_like(current, 110)  # the current frame through the VAE: no block
    predicted = redrawn.copy()  # the model changes nothing there...
    predicted[0, 10:14, 10:14] = (255, 255, 255)  # ...and moves the arm in here
    out = keep_unchanged(predicted, redrawn, current, threshold=30)
    assert (out[0, 2:4, 2:4] == (250, 200, 0)).all()  # the block comes back as the camera saw it
    assert (out[0, 0, 15] == 100).all()  # the rest of the unchanged scene is the camera's too
    assert (out[0, 10:14, 10:14] == 255).all()  # the predicted change is the model's
    assert (out[0, 9, 11] == predicted[0, 9, 11]).all()  # so is its edge (grown by a pixel)
    assert keep_unchanged(predicted, redrawn, current, 0) is predicted  # 0 = off
    with pytest.raises(ValueError, match="different shapes"):
        keep_unchanged(predicted, redrawn[:, :8], current, 30)


def test_the_runner_keeps_what_the_model_does_not_change(torch_runner):
    frames = parity_image(64, seed=4)
    raw = torch_runner.predict(frames, "stack the blocks", steps=2, seed=3)
    assert torch_runner.sampling.keep == 0
    be = torch_runner.backend
    with torch.inference_mode():
        redrawn = unit_to_uint8(model_to_unit(be.decode(be.encode_image(images_to_model(frames)))))
    for threshold in (20.0, 60.0):
        kept = torch_runner.predict(frames, "stack the blocks", steps=2, seed=3, keep=threshold)
        assert np.array_equal(kept, keep_unchanged(raw, redrawn, frames, threshold))
    be.reset_stats()
    assert np.array_equal(torch_runner.predict(frames, "stack the blocks", steps=2, seed=3, keep=255.0), frames)
    assert be.stats["vae_encoder"][0] == 1  # the sampler conditions on the same encoding keep redraws from
    assert 0 < (kept == frames).all(-1).mean() < 1  # some of both at 60: the test could tell them apart


def test_eval_keeps_as_the_runner_does(tiny_pipeline_dir, torch_runner):
    from lftk.model.base import load_pipeline

    frame = parity_image(64, seed=5)[0]
    pipe = load_pipeline(tiny_pipeline_dir)
    be = torch_runner.backend
    with torch.inference_mode():
        ours = unit_to_uint8(model_to_unit(be.decode(be.encode_image(images_to_model(frame[None])))))
    assert np.abs(redraw(pipe, frame[None]).astype(int) - ours.astype(int)).max() <= 1
    item = EvalItem(pair=None, current=frame, prompt="stack the blocks", seed=11)
    settings = EvalSettings(64, "{instruction}", 2, 3.0, 1.5, 0, 1, "cpu", keep=40.0)
    theirs = PipelinePredictor(pipe, settings)([item])[0]
    runner_frames = torch_runner.predict(frame[None], "stack the blocks", steps=2, guidance=3.0, image_guidance=1.5,
                                         seed=11, keep=40.0)[0]
    # the same frames up to float rounding; the mask may flip at a pixel whose difference sits on the threshold
    assert (np.abs(runner_frames.astype(int) - theirs.astype(int)) > 1).mean() < 0.01


def test_recipe_keep_must_be_uint8_levels():
    from lftk.config import SamplingConfig

    assert SamplingConfig(keep=48).keep == [48.0]
    with pytest.raises(ValueError, match="0-255"):
        SamplingConfig(keep=[0, 300])


def test_ddim_does_not_clip_latents_unless_the_config_says_so():
    config = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    assert make_scheduler(config, "ddim").config.clip_sample is False  # latents' std is ~1: [-1, 1] flattens them
    assert make_scheduler({**config, "clip_sample": True}, "ddim").config.clip_sample is True


def test_eval_reports_the_keep_it_used(tiny_pipeline_dir, tiny_pairs_dir, tmp_path):
    from lftk.eval.evaluate import evaluate

    report = evaluate(tiny_pipeline_dir, tiny_pairs_dir, tmp_path / "eval", baselines=["copy"], steps=1, keep=40.0,
                      max_samples=2)
    assert report["settings"]["keep"] == 40.0
    text = (tmp_path / "eval" / "report.md").read_text()
    assert "image guidance 1.5, keep 40 (" in text and "- Keep 40: the model's frames take" in text
