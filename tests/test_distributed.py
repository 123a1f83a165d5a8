"""2 ranks with ZeRO-2 (gloo, CPU) train the same model as 1 rank with the same global batch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
UNET = "final/unet/diffusion_pytorch_model.safetensors"


def _train(run: Path, pairs: Path, base: Path, *extra: str, recipe: str = "recipes/demo.yaml") -> None:
    cmd = [
        sys.executable, "-m", "lftk.cli", "train", recipe, f"output_dir={run}", f"data.path={pairs}",
        f"model.base={base}", "max_steps=3", "train.lr=2e-3", "train.warmup_steps=0", "train.zero_stage=2",
        "train.conditioning_dropout=0.3", *extra,
    ]
    res = subprocess.run(cmd, cwd=REPO, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]


# Distillation (recipes/demo-distill.yaml): the tiny pipeline is its own teacher; one tuned candidate.
DISTILL = ("distill.teacher={base}", "train.conditioning_dropout=0.0", "sampling.keep=0", "sampling.keep_objects=false")


@pytest.mark.parametrize("recipe", ["recipes/demo.yaml", "recipes/demo-distill.yaml"])
def test_two_ranks_equal_one_rank_with_the_same_global_batch(tmp_path, tiny_pairs_dir, tiny_pipeline_dir, recipe):
    extra = [a.format(base=tiny_pipeline_dir) for a in DISTILL] if "distill" in recipe else []
    _train(tmp_path / "one", tiny_pairs_dir, tiny_pipeline_dir, "train.batch_size=4", *extra, recipe=recipe)
    _train(tmp_path / "two", tiny_pairs_dir, tiny_pipeline_dir, "train.batch_size=2", *extra, "--nproc", "2", recipe=recipe)
    one, two = load_file(tmp_path / "one" / UNET), load_file(tmp_path / "two" / UNET)
    base = load_file(tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors")
    # Compare whole updates: Adam divides by sqrt(v), so a parameter whose gradient is ~0 can move by
    # up to lr on either side from float reduction-order noise alone; the update as a vector cannot.
    flat = lambda sd: torch.cat([sd[k].flatten() for k in sorted(base)])  # noqa: E731
    update_one, update_two = flat(one) - flat(base), flat(two) - flat(base)
    rel = ((update_one - update_two).norm() / update_one.norm()).item()
    cos = torch.nn.functional.cosine_similarity(update_one, update_two, dim=0).item()
    assert update_one.norm() > 1e-2, "training barely moved the weights: the comparison would prove nothing"
    assert rel < 1e-2 and cos > 0.9999, f"2-rank update differs from 1-rank: relative {rel:.2e}, cosine {cos:.6f}"
