"""`lftk train --dry-run`: per-rank memory on the full SD 1.5 architecture (meta device, no weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from lftk.cli import app
from lftk.config import load_recipe
from lftk.train.memory import estimate

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _rows(recipe, world=1):
    est = estimate(recipe, world)
    return est, {name.split(" (")[0].split(" +")[0]: gib for name, gib, _ in est.rows}


def test_24gb_recipe_fits_24gb_and_full_adamw_fp32_does_not():
    est, rows = _rows(load_recipe(RECIPES / "stage2-24gb.yaml"))
    assert est.trainable > 850e6, "the sd15 UNet has ~860 M parameters"
    assert est.total_gib < 24
    heavy = load_recipe(RECIPES / "stage2-24gb.yaml", ["train.optimizer=adamw", "train.precision=fp32",
                                                        "train.gradient_checkpointing=false", "train.batch_size=8", "train.resolution=512"])
    assert estimate(heavy).total_gib > 24


def test_each_knob_moves_its_own_row():
    base = ["train.trainable=full", "train.precision=fp32"]
    _, adam = _rows(load_recipe(RECIPES / "stage2.yaml", base))
    _, eight = _rows(load_recipe(RECIPES / "stage2.yaml", [*base, "train.optimizer=adamw8bit"]))
    assert adam["optimizer state"] == pytest.approx(4 * eight["optimizer state"])
    _, two = _rows(load_recipe(RECIPES / "stage2.yaml", base), world=2)
    assert two["gradients"] == pytest.approx(adam["gradients"] / 2)
    assert two["trainable weights"] == pytest.approx(adam["trainable weights"])  # ZeRO-2 keeps full weights
    _, ckpt = _rows(load_recipe(RECIPES / "stage2.yaml", [*base, "train.gradient_checkpointing=true"]))
    assert ckpt["UNet activations"] < adam["UNet activations"] / 4
    _, big = _rows(load_recipe(RECIPES / "stage2.yaml", [*base, "train.batch_size=16"]))
    assert big["UNet activations"] == pytest.approx(2 * adam["UNet activations"], rel=0.05)


def test_dry_run_cli_prints_verdict():
    res = CliRunner().invoke(app, ["train", str(RECIPES / "stage2-24gb.yaml"), "--dry-run", "--gpu-mem", "24"])
    assert res.exit_code == 0, res.output
    assert "fits a 24 GiB card" in res.output and "optimizer state" in res.output


def test_distillation_counts_the_frozen_teacher_unet():
    plain = load_recipe(RECIPES / "stage2-24gb.yaml")
    distil = load_recipe(RECIPES / "stage2-24gb.yaml", ["distill.teacher=runs/stage2", "train.loss.perceptual=0",
                                                         "train.loss.adversarial=0"])
    (_, rows), base = _rows(distil), estimate(plain)
    assert rows["teacher UNet"] == pytest.approx(860e6 * 2 / 2**30, rel=0.05), "SD 1.5's UNet in fp16"
    assert estimate(distil).total_gib == pytest.approx(base.total_gib + rows["teacher UNet"])
