"""Training end to end on the tiny model: the real CLI in-process, DeepSpeed ZeRO-2 on CPU (gloo)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from lftk.cli import main

RECIPE = "recipes/demo.yaml"


def _train(monkeypatch, *args):
    monkeypatch.setattr("sys.argv", ["lftk", "train", RECIPE, *args])
    with pytest.raises(SystemExit) as info:
        main()
    return info.value.code


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_pipeline_dir, tiny_pairs_dir):
    run = tmp_path_factory.mktemp("run") / "r"
    mp = pytest.MonkeyPatch()
    code = _train(
        mp, f"output_dir={run}", f"data.path={tiny_pairs_dir}", f"model.base={tiny_pipeline_dir}",
        "max_steps=4", "train.batch_size=2", "train.log_every=1", "train.warmup_steps=0",
    )
    mp.undo()
    assert code in (0, None)
    return run


def test_run_dir_holds_the_artifact_set(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"resolved_config.yaml", "metrics.jsonl", "loss.png", "checkpoints", "final"} <= names
    assert (trained_run / "checkpoints" / "latest").read_text().strip() == "step0000004"
    rows = [json.loads(x) for x in (trained_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert all(math.isfinite(x) and x > 0 for x in losses)
    assert any("val_loss" in r for r in rows)
    meta = json.loads((trained_run / "final" / "lftk_model.json").read_text())
    assert meta["resolution"] == 64 and meta["trainable"] == "full" and meta["steps"] == 4 and meta["horizon"] == 10


def test_final_loads_in_stock_diffusers_and_predicts(trained_run, tiny_pipeline_dir):
    import torch
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from safetensors.torch import load_file

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(str(trained_run / "final"), safety_checker=None)
    img = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
    out = pipe("stack blocks", image=img, num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    # Training changed the UNet and left the frozen VAE alone.
    name = "diffusion_pytorch_model.safetensors"
    trained, base = load_file(trained_run / "final/unet" / name), load_file(tiny_pipeline_dir / "unet" / name)
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    vae_t, vae_b = load_file(trained_run / "final/vae" / name), load_file(tiny_pipeline_dir / "vae" / name)
    assert all(torch.equal(vae_t[k], vae_b[k]) for k in vae_b)


def test_existing_run_refused_without_resume(trained_run, monkeypatch, capsys, tiny_pairs_dir, tiny_pipeline_dir):
    code = _train(monkeypatch, f"output_dir={trained_run}", f"data.path={tiny_pairs_dir}", f"model.base={tiny_pipeline_dir}", "max_steps=4")
    assert code == 2
    assert "--resume" in capsys.readouterr().err


def test_too_few_pairs_is_a_clear_error(tmp_path, monkeypatch, capsys, tiny_pairs_dir, tiny_pipeline_dir):
    code = _train(monkeypatch, f"output_dir={tmp_path / 'r'}", f"data.path={tiny_pairs_dir}",
                  f"model.base={tiny_pipeline_dir}", "max_steps=1", "train.batch_size=64")
    assert code == 2
    assert "fewer than one batch" in capsys.readouterr().err
    assert not (tmp_path / "r").exists(), "a refused run must leave no run dir behind"


def test_lora_run_saves_merged_model_and_loadable_adapters(tmp_path, monkeypatch, tiny_pairs_dir, tiny_pipeline_dir):
    import torch
    from diffusers import StableDiffusionInstructPix2PixPipeline

    run = tmp_path / "lora"
    code = _train(
        monkeypatch, f"output_dir={run}", f"data.path={tiny_pairs_dir}", f"model.base={tiny_pipeline_dir}",
        "max_steps=3", "train.batch_size=2", "train.trainable=lora", "train.lora.rank=4", "train.lora.alpha=8",
        "train.lr=1e-2", "train.warmup_steps=0",
        # A second UNet part at another rank and scale: one adapter, per-module ranks in its saved peft config.
        "train.lora.parts={self_attn: {component: unet, targets: [attn1.to_q, attn1.to_v], rank: 2, alpha: 6}}",
    )
    assert code in (0, None)
    assert (run / "final" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    parts = json.loads((run / "final" / "lftk_model.json").read_text())["lora"]["resolved_parts"]
    assert {k: (v["rank"], v["alpha"], v["modules"]) for k, v in parts.items()} == {"default": (4, 8.0, 16), "self_attn": (2, 6.0, 8)}
    merged = StableDiffusionInstructPix2PixPipeline.from_pretrained(str(run / "final"), safety_checker=None)
    base = StableDiffusionInstructPix2PixPipeline.from_pretrained(str(tiny_pipeline_dir), safety_checker=None)
    x, t, e = torch.randn(1, 8, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        plain = base.unet(x, t, e).sample
        merged_out = merged.unet(x, t, e).sample
        base.load_lora_weights(str(run / "final" / "lora"))
        adapted = base.unet(x, t, e).sample
    assert (merged_out - plain).abs().max() > 1e-4, "the adapters learned nothing"
    # Stock diffusers loading of the adapters (alpha/r scaling from the saved metadata) equals the merge.
    assert torch.allclose(adapted, merged_out, atol=1e-4)
    loaded = {".".join(name.split(".")[-2:]): {(r, m.scaling[a]) for a, r in m.r.items()}
              for name, m in base.unet.named_modules() if isinstance(getattr(m, "r", None), dict)}
    assert loaded["attn1.to_q"] == {(2, 3.0)} and loaded["attn2.to_q"] == {(4, 2.0)}, loaded  # rank, alpha/rank


def test_latent_cache_trains_the_same_model_and_is_reused(tmp_path, monkeypatch, tiny_pairs_dir, tiny_pipeline_dir):
    import torch
    from safetensors.torch import load_file

    cache = tmp_path / "latents"
    common = (f"data.path={tiny_pairs_dir}", f"model.base={tiny_pipeline_dir}", "max_steps=2", "train.batch_size=2",
              "train.warmup_steps=0", "train.lr=1e-3", "train.conditioning_dropout=0.3")
    assert _train(monkeypatch, f"output_dir={tmp_path / 'plain'}", *common, "train.cache_latents=false") in (0, None)
    assert not cache.exists()
    assert _train(monkeypatch, f"output_dir={tmp_path / 'cached'}", *common, f"data.latent_cache={cache}") in (0, None)
    built = sorted(cache.glob("vae-*-64px/train/*.npy"))
    assert [p.name for p in built] == ["cur_mode.npy", "fut_mean.npy", "fut_std.npy"]
    stamp = built[0].stat().st_mtime_ns
    assert _train(monkeypatch, f"output_dir={tmp_path / 'again'}", *common, f"data.latent_cache={cache}") in (0, None)
    assert built[0].stat().st_mtime_ns == stamp, "a valid cache must be reused, not rebuilt"
    name = "final/unet/diffusion_pytorch_model.safetensors"
    plain, cached = load_file(tmp_path / "plain" / name), load_file(tmp_path / "cached" / name)
    base = load_file(tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors")
    moved = max((plain[k] - base[k]).abs().max().item() for k in base)
    diff = max((plain[k] - cached[k]).abs().max().item() for k in base)
    assert moved > 1e-4 and diff < 0.05 * moved, (moved, diff)
    assert torch.equal(load_file(tmp_path / "cached" / name)["conv_in.weight"], load_file(tmp_path / "again" / name)["conv_in.weight"])


def test_progressive_resolution_and_cosine_schedule(tmp_path, monkeypatch, tiny_pairs_dir, tiny_pipeline_dir):
    run, cache = tmp_path / "prog", tmp_path / "latents"
    code = _train(
        monkeypatch, f"output_dir={run}", f"data.path={tiny_pairs_dir}", f"model.base={tiny_pipeline_dir}",
        "max_steps=4", "train.batch_size=2", "train.log_every=1", "train.warmup_steps=1", "train.lr_schedule=cosine",
        "train.resolution_schedule=[{until: 0.5, resolution: 32}]", f"data.latent_cache={cache}", "train.val_every=1",
    )
    assert code in (0, None)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["resolution"] for r in steps] == [32, 32, 64, 64]
    lrs = [r["lr"] for r in steps]  # lr after each step: warm-up to peak, then cosine down to 0
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(5e-4 * 0.5 * (1 + math.cos(math.pi / 3)))
    assert lrs[-1] == pytest.approx(0.0)
    assert lrs == sorted(lrs, reverse=True)
    assert len([r for r in rows if "val_loss" in r]) == 4
    assert {p.name.split("-")[-1] for p in cache.iterdir()} == {"32px", "64px"}


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys, tiny_pairs_dir, tiny_pipeline_dir):
    """A NaN loss after two good checkpoints: exit 2, `latest` still names the last good one, no final."""
    import lftk.train.loop as loop

    real_loss, calls = loop.training_loss, []

    def loss_nan_at_third_step(*args, **kwargs):
        loss, *rest = real_loss(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), *rest

    monkeypatch.setattr(loop, "training_loss", loss_nan_at_third_step)
    run = tmp_path / "nan"
    code = _train(
        monkeypatch, f"output_dir={run}", f"data.path={tiny_pairs_dir}", f"model.base={tiny_pipeline_dir}",
        "max_steps=6", "train.batch_size=2", "train.warmup_steps=0", "train.checkpoint_every=1",
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "loss is nan at step 2" in err and "last good checkpoint" in err
    assert (run / "checkpoints" / "latest").read_text() == "step0000002" and not (run / "final").exists()


def test_diverged_weights_are_not_checkpointed(tmp_path, monkeypatch, capsys, tiny_pairs_dir, tiny_pipeline_dir):
    """lr 1e30: the first step's loss is finite but the weights it leaves are useless. The validation loss
    at the checkpoint says so, and they are not saved as a checkpoint to resume from."""
    run = tmp_path / "diverged"
    code = _train(
        monkeypatch, f"output_dir={run}", f"data.path={tiny_pairs_dir}", f"model.base={tiny_pipeline_dir}",
        "max_steps=6", "train.batch_size=2", "train.lr=1e30", "train.max_grad_norm=0", "train.warmup_steps=0",
        "train.checkpoint_every=1",
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "validation loss is nan at step 1: the weights have diverged" in err
    assert not (run / "checkpoints" / "latest").exists() and not (run / "final").exists()


def test_perceptual_and_adversarial_terms(tmp_path, monkeypatch, capsys, tiny_pairs_dir, tiny_pipeline_dir):
    import torch

    from lftk.train.aux_losses import VGGFeatures

    vgg = tmp_path / "vgg16.pth"  # torchvision's key layout, random weights: the file format is what is tested
    torch.save({f"features.{k}": v for k, v in VGGFeatures().features.state_dict().items()}, vgg)
    run = tmp_path / "aux"
    code = _train(
        monkeypatch, f"output_dir={run}", f"data.path={tiny_pairs_dir}", f"model.base={tiny_pipeline_dir}",
        "max_steps=2", "train.batch_size=2", "train.log_every=1", "train.loss.perceptual=0.1",
        "train.loss.adversarial=0.01", f"train.loss.perceptual_weights={vgg}",
    )
    assert code in (0, None)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert all({"perceptual", "adversarial", "disc"} <= set(r) for r in rows)
    assert all(math.isfinite(r["perceptual"]) and r["perceptual"] > 0 and math.isfinite(r["disc"]) for r in rows)
    ckpt = next((run / "checkpoints").glob("step*/mp_rank_00_model_states.pt"))
    assert "disc" in torch.load(ckpt, weights_only=False)["aux"], "the discriminator must be checkpointed"

    capsys.readouterr()
    run2 = tmp_path / "noweights"
    code = _train(
        monkeypatch, f"output_dir={run2}", f"data.path={tiny_pairs_dir}", f"model.base={tiny_pipeline_dir}",
        "max_steps=1", "train.batch_size=2", "train.log_every=1", "train.loss.perceptual=0.1",
    )
    assert code in (0, None)
    assert "perceptual term is off" in capsys.readouterr().err
    assert "perceptual" not in (run2 / "metrics.jsonl").read_text()


def test_val_metrics_are_logged_beside_the_copy_baseline(trained_run):
    rows = [json.loads(x) for x in (trained_run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_loss" in r]
    assert val and {"val_ssim", "val_psnr", "val_copy_psnr"} <= set(val[-1])
    assert 0 < val[-1]["val_ssim"] <= 1
    assert (trained_run / "val_metrics.png").is_file()
