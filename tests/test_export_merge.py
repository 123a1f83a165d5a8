"""Merging a LoRA run's adapters: equals final/'s merged UNet, and merging a merged model is a success."""

from __future__ import annotations

import shutil

import pytest
import torch

from lftk.errors import LftkError
from lftk.export.merge import LORA_DIR, merge_run
from lftk.model.base import read_meta

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


def _unet(d):
    from safetensors.torch import load_file

    return load_file(d / UNET_FILE)


def test_merge_rebuilds_the_runs_merged_unet_and_twice_is_a_no_op(lora_run, tiny_pipeline_dir, tmp_path):
    merged = merge_run(lora_run, tmp_path / "merged")
    assert merged.merged and merged.pipeline_dir == tmp_path / "merged"
    assert merged.max_abs_diff <= 1e-4
    assert not (tmp_path / "merged" / LORA_DIR).exists()
    ours, final, base = _unet(tmp_path / "merged"), _unet(lora_run / "final"), _unet(tiny_pipeline_dir)
    assert max((ours[k] - final[k]).abs().max().item() for k in final) <= 1e-4
    assert any(not torch.allclose(ours[k], base[k]) for k in base), "the adapters changed nothing"
    meta = read_meta(tmp_path / "merged")
    # What training knew travels with the merged model.
    assert meta["resolution"] == 64 and meta["horizon"] == 10 and meta["prompt_template"] == "Scene after '{instruction}'"
    assert meta["lora"]["rank"] == 4 and meta["merged_lora"]["base"] == str(tiny_pipeline_dir)

    again = merge_run(tmp_path / "merged", tmp_path / "merged2")
    assert not again.merged and again.pipeline_dir == tmp_path / "merged"
    assert "already merged" in again.message
    assert not (tmp_path / "merged2").exists()  # a no-op writes nothing
    # Merging the run again (into the same place) is a success too.
    assert merge_run(lora_run, tmp_path / "merged").merged


def test_merge_refuses_adapters_that_do_not_reproduce_final(lora_run, tmp_path):
    from safetensors.torch import save_file

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    weights = _unet(run / "final")
    key = next(k for k in weights if k.endswith("conv_out.bias"))
    weights[key] = weights[key] + 0.1  # final/ no longer equals base + adapters
    save_file(weights, run / "final" / UNET_FILE)
    with pytest.raises(LftkError, match=r"differ from .* merged UNet by 0\.1"):
        merge_run(run, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_merge_needs_the_base(lora_run, tmp_path):
    import json

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    meta_path = run / "final" / "lftk_model.json"
    meta = json.loads(meta_path.read_text())
    meta["base"] = "models/tiny/moved-away"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(LftkError, match=r"base model 'models/tiny/moved-away' .* not found"):
        merge_run(run, tmp_path / "merged")
