"""Few-step distillation (recipes/demo-distill.yaml) on the tiny model: the real CLI in-process.

The student's final/ is a stock pipeline with LCMScheduler and says what it was distilled from; its
export has a one-branch UNet profile; every runner path makes one UNet call per step; asking it for
guidance branches is an error. 2 ranks and SIGKILL-resume: tests/test_distributed.py, test_resume.py.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from lftk.cli import main
from lftk.errors import LftkError

RECIPE = "recipes/demo-distill.yaml"


def _train(monkeypatch, *args):
    monkeypatch.setattr("sys.argv", ["lftk", "train", RECIPE, *args])
    with pytest.raises(SystemExit) as info:
        main()
    return info.value.code


def distill_args(run, pairs, teacher, *extra: str) -> list[str]:
    """Overrides that point recipes/demo-distill.yaml at a tiny teacher and pairs."""
    return [f"output_dir={run}", f"data.path={pairs}", f"model.base={teacher}", f"distill.teacher={teacher}",
            "train.batch_size=2", "train.log_every=1", "train.warmup_steps=0", "sampling.tune_samples=2", *extra]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_pipeline_dir):
    """The tiny pipeline with recorded sampling 1.5 / 3.0 (as a trained teacher has)."""
    from lftk.model.base import write_meta

    out = tmp_path_factory.mktemp("teacher") / "pipeline"
    shutil.copytree(tiny_pipeline_dir, out)
    write_meta(out, {"sampling": {"steps": 20, "guidance": 1.5, "image_guidance": 3.0, "keep": 0, "keep_objects": False}})
    return out


@pytest.fixture(scope="module")
def student_run(tmp_path_factory, teacher_dir, tiny_pairs_dir):
    run = tmp_path_factory.mktemp("distill") / "s"
    mp = pytest.MonkeyPatch()
    code = _train(mp, *distill_args(run, tiny_pairs_dir, teacher_dir, "max_steps=3", "train.lr=1e-3", "distill.steps=2"))
    mp.undo()
    assert code in (0, None)
    return run


def test_student_is_a_stock_pipeline_with_lcm_and_says_what_it_was_distilled_from(student_run, teacher_dir):
    from diffusers import LCMScheduler, StableDiffusionInstructPix2PixPipeline

    final = student_run / "final"
    meta = json.loads((final / "lftk_model.json").read_text())
    d = meta["distilled"]
    assert d["teacher"] == str(teacher_dir) and d["steps"] == 2 and d["guidance"] == [1.5, 3.0]
    assert d["scheduler"] == "lcm" and d["teacher_sampling"]["steps"] == 20
    s = meta["sampling"]
    assert (s["steps"], s["guidance"], s["image_guidance"], s["scheduler"]) == (2, 1.0, 1.0, "lcm")
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(str(final), safety_checker=None)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.scheduler.config.original_inference_steps == 50
    from PIL import Image

    out = pipe("stack blocks", image=Image.new("RGB", (64, 64), (90, 120, 30)), num_inference_steps=2,
               guidance_scale=1.0, image_guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()
    losses = [json.loads(line) for line in (student_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if "loss" in r] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in losses if "loss" in r)


def test_training_moved_the_student_away_from_the_teacher(student_run, teacher_dir):
    from safetensors.torch import load_file

    name = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(teacher_dir / name), load_file(student_run / "final" / name)
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-4


def test_runner_makes_one_unet_call_per_step_and_refuses_guidance(student_run):
    from lftk.runtime.backends import open_backend
    from lftk.runtime.runner import Runner

    runner = Runner.from_backend(open_backend(student_run, "torch"))
    assert runner.scheduler_kind == "lcm" and type(runner.sampler.scheduler).__name__ == "LCMScheduler"
    calls = []
    unet = runner.backend.unet
    runner.backend.unet = lambda sample, t, e: calls.append(sample.shape[0]) or unet(sample, t, e)
    frames = np.full((2, 64, 64, 3), 100, np.uint8)
    runner.predict(frames, "stack blocks", keep=0, keep_objects=False)
    assert calls == [2, 2], "2 steps x one call of batch 2 (one row per frame, no guidance branches)"
    calls.clear()
    runner.rollout(frames[0], "stack blocks", frames=3, steps=1, keep=0, keep_objects=False)
    assert calls == [1, 1, 1]
    with pytest.raises(LftkError, match="distilled student"):
        runner.predict(frames, "stack blocks", guidance=3.0)


def test_export_builds_a_one_branch_unet_profile(student_run, tmp_path):
    from lftk.export.onnx_export import export_onnx
    from lftk.runtime.manifest import read_manifest

    out = tmp_path / "export"
    export_onnx(student_run, out)
    unet = read_manifest(out)["components"]["unet"]
    assert unet["batch_profile"] == {"min": 1, "opt": 1, "max": 16}
    from lftk.predictor import load

    predictor = load(out, "ort")
    assert predictor.scheduler == "lcm"
    calls = []
    inner = predictor.backend.unet
    predictor.backend.unet = lambda s, t, e: calls.append(s.shape[0]) or inner(s, t, e)
    predictor.rollout(np.full((64, 64, 3), 100, np.uint8), "stack blocks", frames=2)
    assert calls == [1, 1, 1, 1], "2 frames x 2 steps, one row each"


def test_teacher_profile_keeps_three_branches_and_takes_one(tiny_export_dir):
    from lftk.runtime.manifest import read_manifest

    assert read_manifest(tiny_export_dir)["components"]["unet"]["batch_profile"] == {"min": 1, "opt": 3, "max": 48}


@pytest.mark.parametrize("override, message", [
    ("train.loss.colour_weight=1.0", "train.loss.colour_weight"),
    ("distill.guidance=[1.5]", "distill.guidance"),
    ("distill.solver_step=50", "solver_steps"),
])
def test_bad_distill_recipe_is_refused_naming_the_key(monkeypatch, tmp_path, teacher_dir, tiny_pairs_dir, override, message, capsys):
    code = _train(monkeypatch, *distill_args(tmp_path / "r", tiny_pairs_dir, teacher_dir, override))
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_distilled_student_cannot_be_a_teacher(monkeypatch, tmp_path, student_run, tiny_pairs_dir, capsys):
    code = _train(monkeypatch, *distill_args(tmp_path / "r", tiny_pairs_dir, student_run / "final"))
    assert code == 2 and "itself a distilled student" in capsys.readouterr().err


def test_teacher_with_another_prompt_template_is_refused(monkeypatch, tmp_path, teacher_dir, tiny_pairs_dir, capsys):
    code = _train(monkeypatch, *distill_args(tmp_path / "r", tiny_pairs_dir, teacher_dir,
                                             "data.prompt_template=In {horizon} frames: {instruction}"))
    assert code == 2 and "prompt_template" in capsys.readouterr().err


def test_consistency_loss_pulls_towards_the_guided_teacher_step():
    """With the student equal to the teacher, the loss is the gap between one guided DDIM step and
    the student's own jump: zero only when the teacher's step changes nothing the student sees."""
    from diffusers import DDPMScheduler

    from lftk.train.distill import Teacher, student_scheduler, teacher_step

    sched = DDPMScheduler(num_train_timesteps=1000)
    calls = []

    class Unet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, e):
            calls.append(x.shape[0])
            out = x[:, :4] * 0 + e[:, :1, :1].view(-1, 1, 1, 1)  # noise prediction = the text "embedding" value
            return type("O", (), {"sample": out})()

    grid = torch.arange(1, 51) * 20 - 1
    teacher = Teacher(Unet(), 2.0, 1.5, None, {}, grid, 20)
    x = torch.randn(2, 4, 4, 4)
    steps, prev = torch.tensor([999, 499]), torch.tensor([979, 479])
    image = torch.randn(2, 4, 4, 4)
    text, null = torch.full((2, 77, 8), 1.0), torch.zeros(2, 77, 8)
    x_prev = teacher_step(teacher, x, steps, prev, image, text, null, sched)
    assert calls == [6], "three branches of 2 frames in one call"
    # branch outputs 1 (text+image), 0 (image), 0 (none): guided noise = 0 + 2*(1-0) + 1.5*(0-0) = 2
    ab, ab_prev = sched.alphas_cumprod[steps].view(-1, 1, 1, 1), sched.alphas_cumprod[prev].view(-1, 1, 1, 1)
    x0 = (x - (1 - ab).sqrt() * 2.0) / ab.sqrt()
    assert torch.allclose(x_prev, ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * 2.0, atol=1e-5)
    lcm = student_scheduler(sched.config, 50)
    c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(0)
    assert c_skip == pytest.approx(1.0) and c_out == pytest.approx(0.0), "f(x, 0) = x: the boundary condition"


def test_data_weight_adds_the_distance_to_the_real_future_frame(monkeypatch, tmp_path, teacher_dir, tiny_pairs_dir):
    """Same draws, same first batch: the first step's loss with the data term is the distillation loss
    plus a positive distance to the pair's real future latent, and the student records the weight."""
    def first_loss(name, *extra):
        run = tmp_path / name
        code = _train(monkeypatch, *distill_args(run, tiny_pairs_dir, teacher_dir, "max_steps=1", *extra))
        assert code in (0, None)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        meta = json.loads((run / "final" / "lftk_model.json").read_text())
        return next(r["loss"] for r in rows if r.get("step") == 1 and "loss" in r), meta["distilled"]["data_weight"]

    alone, w0 = first_loss("alone", "distill.data_weight=0")  # the demo recipe's own weight is 3
    with_data, w2 = first_loss("data", "distill.data_weight=2.0")
    assert (w0, w2) == (0.0, 2.0)
    assert with_data > alone + 1e-4
