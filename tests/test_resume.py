"""A run killed with SIGKILL and resumed ends with the same weights as one never killed (CPU: bit for bit)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _cmd(run: Path, pairs: Path, base: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "lftk.cli", "train", "recipes/demo.yaml", f"output_dir={run}", f"data.path={pairs}",
        f"model.base={base}", "max_steps=14", "train.batch_size=2", "train.checkpoint_every=2",
        "train.log_every=1", "train.warmup_steps=4", "train.conditioning_dropout=0.3", *extra,
    ]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _unet_bytes(run: Path) -> bytes:
    return (run / "final" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, tiny_pairs_dir, tiny_pipeline_dir):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    res = subprocess.run(_cmd(straight, tiny_pairs_dir, tiny_pipeline_dir), cwd=REPO, env=_env(),
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr

    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(_cmd(killed, tiny_pairs_dir, tiny_pipeline_dir), cwd=REPO, env=_env(),
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not list((killed / "checkpoints").glob("step*/COMPLETE")):
        assert proc.poll() is None, "training ended before it could be killed:\n" + (tmp_path / "killed.log").read_text()
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists(), "killed too late: the run had already finished"

    res = subprocess.run(_cmd(killed, tiny_pairs_dir, tiny_pipeline_dir, "--resume"), cwd=REPO, env=_env(),
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert _unet_bytes(killed) == _unet_bytes(straight), "resumed weights differ from the uninterrupted run"
    steps = [line for line in (killed / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == 14, "metrics after resume must hold each step once"
    assert len(list((killed / "checkpoints").glob("step*"))) == 2, "rotation keeps the newest two"


def test_resume_with_changed_recipe_is_refused(tmp_path, tiny_pairs_dir, tiny_pipeline_dir):
    run = tmp_path / "r"
    subprocess.run(_cmd(run, tiny_pairs_dir, tiny_pipeline_dir, "max_steps=2"), cwd=REPO, env=_env(), check=True,
                   capture_output=True)
    res = subprocess.run(_cmd(run, tiny_pairs_dir, tiny_pipeline_dir, "max_steps=2", "train.lr=1", "--resume"),
                         cwd=REPO, env=_env(), capture_output=True, text=True)
    assert res.returncode == 2
    assert "changed: train" in res.stderr
