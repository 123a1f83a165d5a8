"""Golden slices on the tiny preset (a few output values, as diffusers' pipeline tests pin theirs): a change
to the shared runtime (sampler, scheduler set-up, pixel conversion, prompt encoding) shows up here
even when every other test still passes. The values were recorded from this code on CPU; a deliberate
change to the sampling maths re-records them and says why in its commit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lftk.export.parity import parity_image
from lftk.runtime.pixels import images_to_model, model_to_unit, unit_to_uint8


def test_pixels_go_to_the_model_and_back_exactly():
    x = np.array([[[[0, 128, 255]]]], np.uint8)
    model = images_to_model(x)
    assert model.shape == (1, 3, 1, 1)
    assert model.flatten().tolist() == pytest.approx([-1.0, 2 * 128 / 255 - 1, 1.0], abs=1e-7)
    assert unit_to_uint8(model_to_unit(model)).tolist() == x.tolist()
    assert unit_to_uint8(model_to_unit(torch.full((1, 3, 1, 1), 3.0))).max() == 255  # clamped, not wrapped


def test_the_samplers_output_on_the_tiny_preset_is_pinned(torch_runner):
    runner = torch_runner
    frames = parity_image(64, seed=0)
    latents = runner.denoise(frames, "stack the blocks", steps=2, seed=0)
    assert latents.shape == (1, 4, 16, 16)
    assert latents[0, :, 4, 4].tolist() == pytest.approx([-34.0451, 27.8884, 10.0506, -7.2246], rel=1e-3, abs=1e-3)
    out = runner.predict(frames, "stack the blocks", steps=2, seed=0)
    want = np.array([[137, 126, 148], [162, 86, 118], [194, 56, 131], [199, 0, 132]])
    assert np.abs(out[0, 32, 28:32].astype(int) - want).max() <= 2
    assert np.abs(out[0, 5, 60:62].astype(int) - np.array([[62, 132, 130], [91, 161, 163]])).max() <= 2
