"""Runner and backends on the tiny model: diffusers equivalence, determinism, rollout order, infer."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lftk.runtime.backends import OrtBackend, TorchBackend
from lftk.deploy.infer import run_infer
from lftk.runtime.runner import Runner
from lftk.runtime.pixels import model_to_unit
from lftk.errors import LftkError, NotAvailableError
from lftk.eval.metrics import psnr_db
from lftk.export.parity import parity_image

STEPS = 3  # few steps keep the tier fast; the loop is the same at 20


@pytest.fixture(scope="module")
def torch_backend(tiny_pipeline_dir):
    return TorchBackend(tiny_pipeline_dir)


@pytest.fixture(scope="module")
def ort_backend(tiny_export_dir):
    return OrtBackend(tiny_export_dir)


@pytest.fixture(scope="module")
def ort_runner(ort_backend) -> Runner:
    return Runner.from_backend(ort_backend)  # loading the tokenizer costs ~0.5 s: once per module


@pytest.fixture(scope="module")
def torch_runner(torch_backend) -> Runner:
    return Runner.from_backend(torch_backend)


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    return parity_image(64, seed=3)[0]  # (64, 64, 3) uint8


def test_torch_runner_reproduces_the_diffusers_pipeline(torch_runner, torch_backend, frame):
    runner = torch_runner
    steps = 2
    prompt = "stack the blocks"
    final = {}

    def keep_latents(pipe, i, t, kwargs):
        final["latents"] = kwargs["latents"]
        return kwargs

    ref = torch_backend.pipeline(
        prompt=prompt,
        image=Image.fromarray(frame),
        num_inference_steps=steps,
        guidance_scale=7.5,
        image_guidance_scale=1.5,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
        callback_on_step_end=keep_latents,
    ).images
    latents = runner.denoise(frame[None], prompt, steps=steps, seed=7)
    # Same noise draws and the same arithmetic; only float rounding may differ (latents here reach ~30):
    # on a venv built 2026-12-02, 1 of 1024 latents was 2.3e-4 off at HEAD and at the commit before, so
    # the bound is 1e-3; the frames below must still match to one level.
    torch.testing.assert_close(latents, final["latents"], rtol=1e-4, atol=1e-3)
    ours = runner.predict(frame[None], prompt, steps=steps, seed=7)
    ref_uint8 = (ref * 255).round().astype(np.uint8)
    assert ours.shape == ref_uint8.shape == (1, 64, 64, 3)
    assert np.abs(ours.astype(int) - ref_uint8.astype(int)).max() <= 1


def test_same_seed_same_frames(ort_runner, frame):
    runner = ort_runner
    a = runner.predict(frame[None], "push the block", steps=STEPS, seed=5)
    b = runner.predict(frame[None], "push the block", steps=STEPS, seed=5)
    c = runner.predict(frame[None], "push the block", steps=STEPS, seed=6)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_predict_batches_frames_and_branches_into_one_unet_call(ort_runner, ort_backend, frame, monkeypatch):
    runner = ort_runner
    seen = []
    call = ort_backend._call

    def spy(component, *tensors):
        seen.append((component, tuple(tensors[0].shape)))
        return call(component, *tensors)

    monkeypatch.setattr(ort_backend, "_call", spy)
    frames = np.stack([frame, frame[::-1]])  # (2, 64, 64, 3)
    out = runner.predict(frames, "lift the hammer", steps=STEPS, seed=0)
    assert out.shape == (2, 64, 64, 3) and out.dtype == np.uint8
    unet_shapes = [s for c, s in seen if c == "unet"]
    assert unet_shapes == [(6, 8, 16, 16)] * STEPS  # 3 branches x 2 frames, one call per step
    assert [c for c, _ in seen if c != "unet"] == ["text_encoder", "vae_encoder", "vae_decoder"]
    seen.clear()
    runner.predict(frames, "lift the hammer", steps=1, guidance=1.0, seed=0)  # no guidance: one branch
    assert [s for c, s in seen if c == "unet"] == [(2, 8, 16, 16)]


def test_rollout_feeds_each_prediction_back(ort_runner, frame):
    runner = ort_runner
    frames = runner.rollout(frame, "hand over the block", frames=3, steps=STEPS, seed=10)
    assert len(frames) == 3 and all(f.shape == (64, 64, 3) and f.dtype == np.uint8 for f in frames)
    previous = frame
    for k, predicted in enumerate(frames):
        expected = runner.predict(previous[None], "hand over the block", steps=STEPS, seed=10 + k)[0]
        assert np.array_equal(predicted, expected), f"frame {k + 1} is not predicted from frame {k}"
        previous = predicted


def test_ort_and_torch_runners_agree(ort_runner, torch_runner, frame):
    outs = []
    for runner in (ort_runner, torch_runner):
        latents = runner.denoise(frame[None], "beat the block", steps=STEPS, seed=1)
        outs.append(model_to_unit(runner.sampler.decode(latents)))  # frames in [0, 1], as the runner makes them
    assert psnr_db(*outs) >= 40.0


@pytest.mark.parametrize(
    "kind, cls", [("ddim", "DDIMScheduler"), ("dpmpp", "DPMSolverMultistepScheduler"), ("euler_a", "EulerAncestralDiscreteScheduler")]
)
def test_schedulers_are_selectable_and_deterministic(ort_backend, frame, kind, cls):
    runner = Runner.from_backend(ort_backend, scheduler=kind)
    assert type(runner.sampler.scheduler).__name__ == cls
    if kind == "dpmpp":
        assert runner.sampler.scheduler.config.algorithm_type == "dpmsolver++"
    a = runner.predict(frame[None], "stack", steps=STEPS, seed=0)
    assert np.array_equal(a, runner.predict(frame[None], "stack", steps=STEPS, seed=0))
    assert not np.array_equal(a, frame[None]), "the sampler left the frame as it was"
    with pytest.raises(LftkError, match="unknown scheduler"):
        Runner.from_backend(ort_backend, scheduler="plms")


def test_runner_rejects_wrong_frames(ort_runner, frame):
    runner = ort_runner
    with pytest.raises(LftkError, match=r"\(B, 64, 64, 3\) uint8"):
        runner.predict(frame, "stack")  # a single frame without its batch axis
    with pytest.raises(LftkError, match="uint8"):
        runner.predict(frame[None].astype(np.float32), "stack")
    with pytest.raises(LftkError, match="frames must be >= 1"):
        runner.rollout(frame, "stack", frames=0)


def test_prompt_template(ort_runner, ort_backend):
    assert ort_runner.prompt("stack") == "stack"  # the fixture pipeline's lftk_model.json template
    shared = (ort_backend, ort_runner.tokenizer, ort_runner.sampler.scheduler, 1.0, 64)
    runner = Runner(*shared, prompt_template="Scene after executing '{instruction}'")
    assert runner.prompt("stack") == "Scene after executing 'stack'"
    with pytest.raises(LftkError, match="template"):
        Runner(*shared, prompt_template="{task}").prompt("stack")


def _save_input(path: Path, size: int = 96) -> Path:
    Image.fromarray(parity_image(size, seed=4)[0]).save(path)  # not 64 px: infer resizes it
    return path


def test_run_infer_writes_frames_gif_and_timing(tiny_export_dir, tmp_path):
    image = _save_input(tmp_path / "in.png")
    out = tmp_path / "out"
    summary = run_infer(tiny_export_dir, image, "stack the blocks", backend="ort", frames=2, steps=STEPS, out=out)
    assert sorted(p.name for p in out.iterdir()) == [
        "frame_000.png", "frame_001.png", "frame_002.png", "rollout.gif", "timing.json"
    ]
    from lftk.data.images import load_rgb

    assert np.array_equal(np.asarray(Image.open(out / "frame_000.png")), load_rgb(image, 64))
    with Image.open(out / "rollout.gif") as gif:
        assert gif.n_frames == 3
    timing = json.loads((out / "timing.json").read_text())
    assert timing["backend"] == "ort" and timing["providers"] == ["CPUExecutionProvider"]
    assert timing["steps"] == STEPS and timing["frames"] == 2
    assert timing["unet_calls"] == 2 * STEPS and timing["unet_batch"] == 3
    assert timing["total_seconds"] > 0 and timing["ms_per_frame"] > 0 and timing["ms_per_unet_call"] > 0
    assert summary["out"] == str(out)


def test_run_infer_refusals(tiny_pipeline_dir, tiny_export_dir, tmp_path):
    image = _save_input(tmp_path / "in.png")
    with pytest.raises(LftkError, match=r"run `lftk export .* --onnx --out EXPORT_DIR` first"):
        run_infer(tiny_pipeline_dir, image, "stack", backend="ort", out=tmp_path / "o")
    with pytest.raises(LftkError, match="sweep needs a horizon-conditioned model"):
        run_infer(tiny_export_dir, image, "stack", mode="sweep", out=tmp_path / "o")
    with pytest.raises(NotAvailableError, match="TensorRT"):
        run_infer(tiny_export_dir, image, "stack", backend="trt", out=tmp_path / "o")
    with pytest.raises(LftkError, match="unknown backend"):
        run_infer(tiny_export_dir, image, "stack", backend="tensorflow", out=tmp_path / "o")
    with pytest.raises(LftkError, match="image not found"):
        run_infer(tiny_export_dir, tmp_path / "nope.png", "stack", out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_deploy_runs_without_training_extras(tiny_export_dir, tmp_path):
    """An edge box has no deepspeed, peft or bitsandbytes: import the runtime and run an ORT rollout."""
    image = _save_input(tmp_path / "in.png", 64)
    code = textwrap.dedent(
        f"""
        import sys
        for name in ("deepspeed", "peft", "bitsandbytes"):
            sys.modules[name] = None  # any import of them now raises ImportError
        import lftk.runtime.runner, lftk.runtime.backends, lftk.deploy.infer
        from lftk.deploy.infer import run_infer
        run_infer({str(tiny_export_dir)!r}, {str(image)!r}, "stack", backend="ort", frames=1, steps=1,
                  out={str(tmp_path / "out")!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "frame_001.png").is_file()


def test_requests_batched_together_match_each_alone(ort_runner, frame, monkeypatch):
    """rollout_many: several start frames, instructions, lengths and seeds share UNet calls, and each
    rollout comes out as it does alone (per-frame generators), up to float noise of a bigger batch."""
    runner = ort_runner
    starts = np.stack([frame, frame[::-1], frame[:, ::-1]])
    instructions = ["stack the blocks", "hand over the block", "stack the blocks"]
    lengths, seeds = [2, 1, 3], [5, 6, 7]
    calls = []
    unet = runner.backend.unet
    monkeypatch.setattr(runner.backend, "unet", lambda *t: calls.append(t[0].shape[0]) or unet(*t))
    together = runner.rollout_many(starts, instructions, lengths, STEPS, seeds=seeds)
    assert calls == [9] * STEPS + [6] * STEPS + [3] * STEPS  # 3 branches x the rollouts still running
    assert [len(r) for r in together] == lengths
    monkeypatch.undo()
    for i in range(3):
        alone = runner.rollout(starts[i], instructions[i], lengths[i], STEPS, seed=seeds[i])
        for k, (a, b) in enumerate(zip(alone, together[i])):
            assert psnr_db(a / 255.0, b / 255.0) >= 40.0, f"rollout {i} frame {k + 1} changed by batching"
    other = runner.rollout_many(starts[:1], instructions[:1], [1], STEPS, seeds=[99])[0][0]
    assert not np.array_equal(other, together[0][0]), "the seed did not reach the sampler"
    with pytest.raises(LftkError, match="2 seeds for 3 frames"):
        runner.rollout_many(starts, instructions, lengths, STEPS, seeds=[1, 2])


def test_io_binding_matches_a_plain_run_and_reuses_its_buffer(tiny_export_dir):
    from lftk.runtime.ort_graph import OrtGraph

    backend = OrtBackend(tiny_export_dir)
    graph = backend.graphs["unet"]
    assert graph.io_binding and graph.device.type == "cpu"
    plain = OrtGraph(graph.path, graph.input_dtypes, graph.output_name)
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(3, 8, 16, 16, generator=gen), torch.full((3,), 500.0), torch.randn(3, 77, 32, generator=gen))
    first = graph(*inputs)
    assert torch.equal(first, plain(*inputs))
    buffer = first.data_ptr()
    other = (torch.randn(3, 8, 16, 16, generator=gen), inputs[1], inputs[2])
    second = graph(*other)
    assert second.data_ptr() == buffer and torch.equal(second, plain(*other))  # same shapes: same buffer
    assert graph(*(t[:1] for t in inputs)).shape == (1, 4, 16, 16)  # a new shape gets its own buffer
    # The backend hands out copies: a later call does not change what an earlier one returned.
    a = backend.unet(*inputs)
    backend.unet(*other)
    assert torch.equal(a, plain(*inputs))


def test_more_frames_than_max_batch_go_in_chunks(ort_runner, frame, monkeypatch):
    runner = ort_runner
    starts = np.stack([frame, frame[::-1], frame[:, ::-1]])
    whole = runner.predict(starts, "stack", steps=1, seed=[4, 5, 6])
    calls = []
    unet = runner.backend.unet
    monkeypatch.setattr(runner.backend, "unet", lambda *t: calls.append(t[0].shape[0]) or unet(*t))
    monkeypatch.setattr(runner, "max_batch", 2)
    chunked = runner.predict(starts, "stack", steps=1, seed=[4, 5, 6])
    assert calls == [6, 3]  # 2 frames x 3 branches, then the last frame
    assert psnr_db(whole / 255.0, chunked / 255.0) >= 40.0
    # One seed for all: frame i is seeded seed + i, so the chunk boundaries do not matter.
    assert np.array_equal(runner.predict(starts, "stack", steps=1, seed=4), chunked)


def test_prompt_cache_overflow_keeps_what_the_call_needs(ort_runner, frame):
    runner = ort_runner
    runner._embeds.clear()
    runner.predict(frame[None], "cached instruction", steps=1, seed=0)
    fresh = [f"instruction {i}" for i in range(20)]  # more than the cache holds, next to a cached one
    frames = np.repeat(frame[None], 21, axis=0)
    out = runner.predict(frames, ["cached instruction"] + fresh, steps=1, seed=list(range(21)))
    assert out.shape == (21, 64, 64, 3)
