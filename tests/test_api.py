"""The Python API (`lftk.load`): the README's example as written, frames equal to `lftk infer`'s, the
image forms it takes, and `import lftk` staying light."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lftk
from lftk.deploy.infer import run_infer
from lftk.errors import LftkError
from lftk.export.parity import parity_image

from conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
STEPS = 2
INSTRUCTION = "stack the blocks"


@pytest.fixture(scope="module")
def predictor(tiny_export_dir):
    return lftk.load(tiny_export_dir, backend="ort")


def _readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README: no python block under '## Python API'"
    return match.group(1)


def test_the_readme_example_runs_as_written(tiny_export_dir, tmp_path):
    """The example, unchanged, in a dir where demo/export is the tiny export and frame.png a frame."""
    (tmp_path / "demo").mkdir()
    os.symlink(tiny_export_dir, tmp_path / "demo" / "export")
    Image.fromarray(parity_image(96, seed=2)[0]).save(tmp_path / "frame.png")  # not the model's size: resized
    code = _readme_example() + "\nassert len(frames) == 5 and frames[0].size == future.size == (64, 64)\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=subprocess_env(), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    saved = Image.open(tmp_path / "future.png")
    assert saved.size == (64, 64) and saved.mode == "RGB"


def test_rollout_equals_lftk_infer(predictor, tiny_export_dir, tmp_path):
    frame = tmp_path / "frame.png"
    Image.fromarray(parity_image(64, seed=5)[0]).save(frame)
    summary = run_infer(tiny_export_dir, frame, INSTRUCTION, backend="ort", frames=3, steps=STEPS, seed=7,
                        out=tmp_path / "out")
    ours = predictor.rollout(frame, INSTRUCTION, frames=3, steps=STEPS, seed=7)
    for k, got in enumerate(ours, start=1):
        written = np.asarray(Image.open(Path(summary["out"]) / f"frame_{k:03d}.png").convert("RGB"))
        assert np.array_equal(np.asarray(got), written), f"frame {k} differs from lftk infer's"
    # predict is the rollout's first frame; another seed gives another frame
    first = predictor.predict(frame, INSTRUCTION, steps=STEPS, seed=7)
    assert np.array_equal(np.asarray(first), np.asarray(ours[0]))
    assert not np.array_equal(np.asarray(predictor.predict(frame, INSTRUCTION, steps=STEPS, seed=8)), np.asarray(first))


def test_a_pil_image_an_array_and_a_path_are_the_same_frame(predictor, tmp_path):
    arr = parity_image(128, seed=3)[0]  # 128 px: each form is resized to 64 the same way
    path = tmp_path / "f.png"
    Image.fromarray(arr).save(path)
    outs = [np.asarray(predictor.predict(x, INSTRUCTION, steps=1, seed=0)) for x in (arr, Image.fromarray(arr), path)]
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])
    assert predictor.frame(arr).shape == (64, 64, 3)


def test_bad_images_and_instructions_are_named(predictor):
    with pytest.raises(LftkError, match=r"\(H, W, 3\) uint8"):
        predictor.predict(np.zeros((64, 64, 3), np.float32), INSTRUCTION)
    with pytest.raises(LftkError, match="8 px on its shorter side"):
        predictor.predict(np.zeros((8, 100, 3), np.uint8), INSTRUCTION)
    with pytest.raises(LftkError, match="instruction is empty"):
        predictor.predict(parity_image(64)[0], "  ")
    with pytest.raises(LftkError, match="frames must be >= 1"):
        predictor.rollout(parity_image(64)[0], INSTRUCTION, frames=0)


def test_sampling_keywords_reach_the_model(predictor):
    """guidance and keep given per call change the frame; left out they are the model's own."""
    frame = parity_image(64, seed=4)[0]
    base = np.asarray(predictor.predict(frame, INSTRUCTION, steps=STEPS))
    same = np.asarray(predictor.predict(frame, INSTRUCTION, steps=STEPS, guidance=predictor.sampling.guidance))
    assert np.array_equal(base, same)
    other = np.asarray(predictor.predict(frame, INSTRUCTION, steps=STEPS, guidance=predictor.sampling.guidance + 4))
    assert not np.array_equal(base, other)
    kept = np.asarray(predictor.predict(frame, INSTRUCTION, steps=STEPS, keep=255))  # every pixel changes less
    assert np.array_equal(kept, frame)


def test_import_lftk_loads_no_torch():
    code = "import sys, lftk; assert callable(lftk.load); print(sorted(m for m in ('torch', 'diffusers', 'deepspeed') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
