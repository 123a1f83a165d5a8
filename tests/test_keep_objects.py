"""`keep_objects`: an object of the current frame that the prediction no longer shows is put back."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from lftk.runtime.objects import object_masks, restore_dropped

TABLE = (150, 120, 100)  # dull: chroma 50
RED = (220, 40, 40)
BLUE = (40, 60, 220)


def scene() -> np.ndarray:
    frame = np.full((1, 32, 32, 3), TABLE, np.uint8)
    frame[0, 4:8, 4:8] = RED  # 16 px block
    frame[0, 20:23, 20:23] = BLUE  # 9 px block
    frame[0, 14:18, 14:18] = 245  # a white arm: not an object
    return frame


def test_objects_are_saturated_connected_pixels_of_one_hue():
    masks = object_masks(scene()[0])
    assert sorted(int(m.sum()) for m in masks) == [9, 16]
    touching = scene()
    touching[0, 4:8, 8:10] = BLUE  # a blue pad against the red block: two objects, not one
    assert sorted(int(m.sum()) for m in object_masks(touching[0])) == [8, 9, 16]
    lone = np.full((16, 16, 3), TABLE, np.uint8)
    lone[3, 3] = RED  # one pixel is not an object
    assert object_masks(lone) == []


def test_a_dropped_object_is_put_back_and_a_moved_one_is_left_where_the_model_drew_it():
    current = scene()
    predicted = np.full_like(current, TABLE)
    predicted[0, 24:28, 2:6] = RED  # the model moved the red block and drew it
    predicted[0, 20:23, 20:23] = (110, 100, 130)  # and faded the blue one into the table
    out = restore_dropped(predicted, current)
    assert (out[0, 20:23, 20:23] == BLUE).all()  # the blue block is back as the camera saw it
    assert (out[0, 4:8, 4:8] == TABLE).all()  # the red block is not copied back to where it was
    assert (out[0, 24:28, 2:6] == RED).all()  # the model's red block stays
    assert (out[0, 14:18, 14:18] == TABLE).all()  # the arm is not an object: the model's pixels stay
    assert (predicted[0, 20:23, 20:23] != BLUE).all()  # the input is not changed in place


def test_a_prediction_that_shows_every_object_is_returned_as_it_is():
    current = scene()
    predicted = current.copy()
    predicted[0, 14:18, 14:18] = TABLE  # the arm moved away; both blocks still there
    assert np.array_equal(restore_dropped(predicted, current), predicted)
    with pytest.raises(ValueError, match="different shapes"):
        restore_dropped(predicted[:, :16], current)


def test_the_runner_and_eval_put_back_the_same_objects(tiny_pipeline_dir, torch_runner):
    from lftk.eval.methods import EvalItem, EvalSettings, PipelinePredictor
    from lftk.model.base import load_pipeline

    runner = torch_runner
    frames = np.full((1, 64, 64, 3), TABLE, np.uint8)
    frames[0, 10:16, 10:16] = RED
    frames[0, 40:45, 30:35] = BLUE
    assert runner.sampling.keep_objects is False
    raw = runner.predict(frames, "stack the blocks", steps=2, seed=3)
    kept = runner.predict(frames, "stack the blocks", steps=2, seed=3, keep_objects=True)
    assert np.array_equal(kept, restore_dropped(raw, frames))
    assert (kept[0, 40:45, 30:35] == BLUE).all() and not (raw[0, 40:45, 30:35] == BLUE).all()  # an untrained UNet drops it
    pipe = load_pipeline(tiny_pipeline_dir)
    item = EvalItem(pair=None, current=frames[0], prompt="stack the blocks", seed=11)
    settings = EvalSettings(64, "{instruction}", 2, 3.0, 1.5, 0, 1, "cpu")
    theirs_raw = PipelinePredictor(pipe, settings)([item])[0]
    theirs = PipelinePredictor(pipe, replace(settings, keep_objects=True))([item])[0]
    assert np.array_equal(theirs, restore_dropped(theirs_raw[None], frames)[0])
    ours = runner.predict(frames, "stack the blocks", steps=2, guidance=3.0, image_guidance=1.5, seed=11,
                          keep_objects=True)[0]
    assert (np.abs(ours.astype(int) - theirs.astype(int)) > 1).mean() < 0.01


def test_recipes_and_reports_name_keep_objects(tiny_pipeline_dir, tiny_pairs_dir, tmp_path):
    from lftk.config import SamplingConfig
    from lftk.eval.evaluate import evaluate

    assert SamplingConfig(keep_objects=True).keep_objects == [True]
    assert SamplingConfig().keep_objects == [False]
    report = evaluate(tiny_pipeline_dir, tiny_pairs_dir, tmp_path / "eval", baselines=["copy"], steps=1,
                      keep_objects=True, max_samples=2)
    assert report["settings"]["keep_objects"] is True
    text = (tmp_path / "eval" / "report.md").read_text()
    assert "image guidance 1.5, keep objects (" in text and "- Keep objects: an object of the current frame" in text
