"""A model's own sampling defaults: chosen on the val split at the end of training, recorded in
lftk_model.json, and used by eval, infer, serve and the runner unless told otherwise; and the
v-prediction objective a base's scheduler may ask for."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lftk.runtime.backends import OrtBackend
from lftk.deploy.infer import run_infer
from lftk.runtime.runner import Runner
from lftk.export.parity import parity_image
from lftk.model.base import read_meta, write_meta
from lftk.runtime.params import SamplingParams
from lftk.train.tune import pick, within_margin

RECORDED = {"steps": 2, "guidance": 2.5, "image_guidance": 4.0, "tuned_on": "test"}


@pytest.fixture(scope="module")
def tuned_export(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """The tiny model, recording its own sampling defaults, exported (an export's files are hashed:
    its lftk_model.json cannot be edited after the fact)."""
    from lftk.export.onnx_export import export_onnx

    root = tmp_path_factory.mktemp("tuned")
    shutil.copytree(tiny_pipeline_dir, root / "pipeline")
    write_meta(root / "pipeline", {"sampling": RECORDED})
    export_onnx(root / "pipeline", root / "export")
    return root / "export"


def test_params_take_the_model_defaults_then_what_is_given():
    assert SamplingParams.for_model({}) == SamplingParams()
    p = SamplingParams.for_model({"sampling": RECORDED}, guidance=None, image_guidance=1.0)
    assert (p.steps, p.guidance, p.image_guidance) == (2, 2.5, 1.0)
    with pytest.raises(TypeError, match="unknown sampling parameter"):
        SamplingParams().overridden(guidence=3.0)


def test_runner_and_infer_use_the_recorded_defaults(tuned_export, tmp_path, monkeypatch):
    runner = Runner.from_backend(OrtBackend(tuned_export))
    assert runner.sampling == SamplingParams(2, 2.5, 4.0)
    seen = []
    real = runner.sampler.denoise
    monkeypatch.setattr(runner.sampler, "denoise", lambda *a, **k: seen.append(a[2:5]) or real(*a, **k))
    frame = parity_image(64, seed=0)[0]
    runner.predict(frame[None], "stack")
    runner.predict(frame[None], "stack", guidance=6.0)
    assert seen == [(2, 2.5, 4.0), (2, 6.0, 4.0)]

    img = tmp_path / "frame.png"
    from PIL import Image

    Image.fromarray(frame).save(img)
    summary = run_infer(tuned_export, img, "stack", frames=1, out=tmp_path / "out")
    assert (summary["steps"], summary["guidance"], summary["image_guidance"]) == (2, 2.5, 4.0)
    summary = run_infer(tuned_export, img, "stack", frames=1, out=tmp_path / "out", image_guidance=1.5)
    assert (summary["guidance"], summary["image_guidance"]) == (2.5, 1.5)


def test_eval_uses_the_recorded_defaults_and_says_so(tiny_pipeline_dir, tiny_pairs_dir, tmp_path):
    from lftk.eval.evaluate import evaluate

    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, model)
    write_meta(model, {"sampling": RECORDED})
    report = evaluate(model, tiny_pairs_dir, tmp_path / "eval", baselines=["copy"])
    s = report["settings"]
    assert (s["steps"], s["guidance"], s["image_guidance"]) == (2, 2.5, 4.0)
    assert "lftk_model.json" in s["sampling_from"] and "tuned on test" in s["sampling_from"]
    report = evaluate(model, tiny_pairs_dir, tmp_path / "eval2", baselines=["copy"], steps=1, guidance=1.0,
                      image_guidance=1.0, keep=0.0, keep_objects=False)
    assert (report["settings"]["steps"], report["settings"]["guidance"]) == (1, 1.0)
    assert report["settings"]["sampling_from"] == "given"


def test_pick_takes_the_best_mean_rank_not_one_figure():
    rows = [
        {"guidance": 7.5, "val_psnr": 21.0, "val_motion_psnr": 14.0, "val_ee_err_px": 9.0, "val_obj_missing": 0.9},
        {"guidance": 3.0, "val_psnr": 20.9, "val_motion_psnr": 15.0, "val_ee_err_px": 6.0, "val_obj_missing": 0.5},
        {"guidance": 1.5, "val_psnr": 20.0, "val_motion_psnr": 14.5, "val_ee_err_px": 7.0, "val_obj_missing": None},
    ]
    assert pick(rows)["guidance"] == 3.0  # the best PSNR alone would have taken 7.5


def test_objects_margin_passes_over_candidates_that_erase_what_copy_keeps(caplog):
    rows = [
        {"guidance": 3.0, "image_guidance": 1.5, "keep": 0, "val_psnr": 21.0, "val_motion_psnr": 15.5,
         "val_ee_err_px": 5.0, "val_obj_missing": 0.50, "val_copy_obj_missing": 0.15},
        {"guidance": 3.0, "image_guidance": 1.5, "keep": 64, "val_psnr": 20.2, "val_motion_psnr": 14.8,
         "val_ee_err_px": 6.8, "val_obj_missing": 0.24, "val_copy_obj_missing": 0.15},
    ]
    assert pick(rows)["keep"] == 0  # unbounded, the better frame figures win 3 of 4
    assert pick(within_margin(rows, 0.10))["keep"] == 64
    assert within_margin(rows, None) == rows
    with caplog.at_level("WARNING"):
        assert within_margin(rows, 0.05) == [rows[1]]  # none within: the fewest missing, said so
    assert "no candidate misses at most 0.05 more objects" in caplog.text


def test_training_tunes_guidance_on_val_and_records_it(tiny_pipeline_dir, tiny_pairs_dir, tmp_path, monkeypatch):
    from lftk.cli import main

    run = tmp_path / "run"
    monkeypatch.setattr("sys.argv", [
        "lftk", "train", "recipes/demo.yaml", f"output_dir={run}", f"data.path={tiny_pairs_dir}",
        f"model.base={tiny_pipeline_dir}", "max_steps=2", "train.batch_size=2", "train.val_samples=0",
        "sampling.steps=2", "sampling.guidance=[1.5,3.0]", "sampling.image_guidance=2.0", "sampling.tune_samples=2",
        "sampling.keep=[0,40]", "sampling.keep_objects=[false,true]",
    ])
    from lftk.eval.methods import PipelinePredictor

    calls = []
    real = PipelinePredictor.__call__
    monkeypatch.setattr(PipelinePredictor, "__call__", lambda self, items: calls.append(len(items)) or real(self, items))
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code in (0, None)
    tune = json.loads((run / "sampling_tune.json").read_text())
    assert [(r["guidance"], r["image_guidance"], r["keep"], r["keep_objects"]) for r in tune["results"]] == [
        (g, 2.0, k, o) for g in (1.5, 3.0) for k in (0, 40) for o in (False, True)]
    assert calls == [2, 2]  # one sampling of the 2 val pairs per pair of scales: the keep rules reuse it
    assert all(r["val_n"] == 2 for r in tune["results"])
    recorded = read_meta(run / "final")["sampling"]
    assert (recorded["guidance"], recorded["image_guidance"], recorded["keep"], recorded["keep_objects"],
            recorded["steps"]) == (tune["best"]["guidance"], 2.0, tune["best"]["keep"], tune["best"]["keep_objects"], 2)
    assert recorded["tuned_on"].startswith("2 val pairs, 8 candidates")


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_training_target_follows_the_scheduler_and_x0_inverts_it(kind):
    from diffusers import DDPMScheduler

    from lftk.train.aux_losses import x0_estimate
    from lftk.train.objective import prediction_target

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=kind)
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    steps = torch.tensor([10, 500, 990])
    target = prediction_target(sched, latents, noise, steps)
    assert torch.equal(target, noise) == (kind == "epsilon")
    x0, _ = x0_estimate(sched, sched.add_noise(latents, noise, steps), target, steps)
    assert torch.allclose(x0, latents, atol=1e-4)


def test_an_untrainable_prediction_type_is_a_clear_error():
    from diffusers import DDPMScheduler

    from lftk.errors import LftkError
    from lftk.train.objective import prediction_target

    sched = DDPMScheduler(prediction_type="sample")
    with pytest.raises(LftkError, match="prediction_type 'sample'"):
        prediction_target(sched, torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.tensor([1]))
