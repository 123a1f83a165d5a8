"""`lftk infer` beyond a plain rollout: sweeps over horizons, true frames from an episode, post-processing,
MP4, and the CLI's checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lftk.runtime.backends import OrtBackend
from lftk.deploy.infer import run_infer
from lftk.runtime.runner import Runner
from lftk.errors import LftkError
from lftk.export.parity import parity_image

STEPS = 2
TEMPLATE = "Scene {horizon} frames after executing '{instruction}'"


@pytest.fixture(scope="module")
def horizon_runner(tiny_export_dir) -> Runner:
    """The tiny export posing as a model trained on horizons 10, 20 and 40 with {horizon} in its prompt."""
    plain = Runner.from_backend(OrtBackend(tiny_export_dir))
    return Runner(plain.backend, plain.tokenizer, plain.sampler.scheduler, plain.sampler.scaling_factor,
                  plain.resolution, TEMPLATE, horizons=[40, 10, 20])


@pytest.fixture(scope="module")
def episode_dir(tmp_path_factory) -> Path:
    """An episode of 25 distinct 64 px frames (frame i is parity_image(seed=i))."""
    ep = tmp_path_factory.mktemp("episodes") / "stack" / "episode0"
    ep.mkdir(parents=True)
    for i in range(25):
        Image.fromarray(parity_image(64, seed=i)[0]).save(ep / f"{i}.png")
    (ep / "episode.json").write_text(json.dumps({"instruction": "stack the blocks", "fps": 10}))
    return ep


def test_sweep_predicts_each_horizon_in_one_batch(horizon_runner, monkeypatch):
    runner = horizon_runner
    frame = parity_image(64, seed=1)[0]
    assert runner.horizons == [10, 20, 40] and runner.default_horizon == 40
    seen = []
    unet = runner.backend.unet
    monkeypatch.setattr(runner.backend, "unet", lambda *t: seen.append(t[0].shape[0]) or unet(*t))
    swept = runner.sweep(frame, "stack", [10, 40], steps=STEPS, seed=3)
    assert seen == [6] * STEPS  # 2 horizons x 3 branches, one call per step
    monkeypatch.undo()
    # Each horizon's frame is what a single prediction with that horizon's prompt gives.
    for h, got in zip((10, 40), swept):
        alone = runner.predict(frame[None], "stack", steps=STEPS, seed=[3], horizon=h)[0]
        assert np.abs(alone.astype(int) - got.astype(int)).max() <= 2
    assert not np.array_equal(swept[0], swept[1]), "the horizon did not reach the prompt"
    assert runner.prompt("stack", 20) == "Scene 20 frames after executing 'stack'"
    assert runner.prompt("stack") == "Scene 40 frames after executing 'stack'"  # default: the largest


def test_infer_sweep_and_episode_truth(horizon_runner, tiny_export_dir, episode_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(Runner, "from_backend", classmethod(lambda cls, be, scheduler="euler_a": horizon_runner))
    out = tmp_path / "sweep"
    summary = run_infer(tiny_export_dir, None, None, mode="sweep", steps=STEPS, out=out, episode=episode_dir,
                        start_frame=5, postprocess="color")
    assert summary["frames_ahead"] == [10, 20, 40] and summary["frames"] == 3
    assert summary["instruction"] == "stack the blocks" and summary["image"].endswith("5.png")
    assert summary["unet_batch"] == 9  # 3 horizons x 3 branches per call
    assert summary["postprocess"] == ["color"]
    truth = summary["truth"]
    assert truth["frames"] == [15, None, None]  # 5+20 and 5+40 are past the episode's 25 frames
    assert truth["psnr_db"][0] is not None and truth["psnr_db"][1:] == [None, None]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["compare.gif", "frame_000.png", "frame_001.png", "frame_002.png", "frame_003.png",
                     "rollout.gif", "timing.json", "truth_000.png", "truth_001.png"]
    assert np.array_equal(np.asarray(Image.open(out / "truth_001.png")), parity_image(64, seed=15)[0])
    with Image.open(out / "compare.gif") as gif:
        assert gif.n_frames == 3 and gif.width == 2 * 64 + 2


def test_infer_rollout_against_episode_with_mp4(tiny_export_dir, episode_dir, tmp_path):
    pytest.importorskip("av", reason="PyAV (the data extra) writes the MP4")
    out = tmp_path / "roll"
    summary = run_infer(tiny_export_dir, None, None, frames=3, steps=STEPS, out=out, episode=episode_dir,
                        horizons=[8], mp4=True, scheduler="dpmpp")
    assert summary["frames_ahead"] == [8, 16, 24] and summary["truth"]["frames"] == [8, 16, 24]
    assert all(isinstance(v, float) for v in summary["truth"]["psnr_db"])
    assert summary["scheduler"] == "dpmpp"
    import av

    with av.open(str(out / "rollout.mp4")) as video:
        assert sum(1 for _ in video.decode(video=0)) == 4  # the input and 3 predictions


def test_infer_refusals(tiny_export_dir, episode_dir, tmp_path):
    image = tmp_path / "in.png"
    Image.fromarray(parity_image(64, seed=4)[0]).save(image)
    with pytest.raises(LftkError, match="rollout takes one --horizon"):
        run_infer(tiny_export_dir, image, "stack", horizons=[10, 20], out=tmp_path / "o")
    with pytest.raises(LftkError, match="unknown post-processing"):
        run_infer(tiny_export_dir, image, "stack", postprocess="blur", out=tmp_path / "o")
    with pytest.raises(LftkError, match="--start-frame 99"):
        run_infer(tiny_export_dir, None, None, episode=episode_dir, start_frame=99, out=tmp_path / "o")
    with pytest.raises(LftkError, match="episode.json"):
        run_infer(tiny_export_dir, None, None, episode=tmp_path, out=tmp_path / "o")
    with pytest.raises(LftkError, match="give --image"):
        run_infer(tiny_export_dir, None, "stack", out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_infer_cli_parses_horizons(tmp_path):
    from typer.testing import CliRunner

    from lftk.cli import app

    result = CliRunner().invoke(app, ["infer", "--model", str(tmp_path), "--image", "x.png", "--instruction", "s",
                                      "--horizon", "10,abc"])
    assert result.exit_code != 0 and "--horizon '10,abc'" in str(result.exception) + result.output
