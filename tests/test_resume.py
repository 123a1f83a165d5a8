"""A run killed with SIGKILL and resumed ends with the same weights as one never killed (CPU: bit for bit)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import subprocess_env

REPO = Path(__file__).resolve().parent.parent


def _cmd(run: Path, pairs: Path, base: Path, *extra: str, recipe: str = "recipes/demo.yaml") -> list[str]:
    if "distill" in recipe:  # the tiny pipeline is its own teacher; one sampling candidate
        extra = (f"distill.teacher={base}", "sampling.keep=0", "sampling.keep_objects=false", *extra)
    return [
        sys.executable, "-m", "lftk.cli", "train", recipe, f"output_dir={run}", f"data.path={pairs}",
        f"model.base={base}", "max_steps=14", "train.batch_size=2", "train.checkpoint_every=2",
        "train.log_every=1", "train.warmup_steps=4", "train.conditioning_dropout=0.3", *extra,
    ]


def _env() -> dict:
    return subprocess_env(OMP_NUM_THREADS="1")


def _unet_bytes(run: Path) -> bytes:
    return (run / "final" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()


@pytest.mark.parametrize("recipe", ["recipes/demo.yaml", "recipes/demo-distill.yaml"])
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, tiny_pairs_dir, tiny_pipeline_dir, recipe):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    res = subprocess.run(_cmd(straight, tiny_pairs_dir, tiny_pipeline_dir, recipe=recipe), cwd=REPO, env=_env(),
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr

    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(_cmd(killed, tiny_pairs_dir, tiny_pipeline_dir, recipe=recipe), cwd=REPO, env=_env(),
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not list((killed / "checkpoints").glob("step*/COMPLETE")):
        assert proc.poll() is None, "training ended before it could be killed:\n" + (tmp_path / "killed.log").read_text()
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists(), "killed too late: the run had already finished"

    res = subprocess.run(_cmd(killed, tiny_pairs_dir, tiny_pipeline_dir, "--resume", recipe=recipe), cwd=REPO, env=_env(),
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


def test_adamw8bit_under_zero_keeps_its_8bit_state_across_resume(tmp_path, tiny_pairs_dir, tiny_pipeline_dir):
    import torch

    extra = ("train.optimizer=adamw8bit", "train.min_8bit_size=256", "max_steps=4")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for run, steps in ((straight, "max_steps=4"), (resumed, "max_steps=2")):
        res = subprocess.run(_cmd(run, tiny_pairs_dir, tiny_pipeline_dir, *extra, steps), cwd=REPO, env=_env(),
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-3000:]
    optim = next((resumed / "checkpoints" / "step0000002").glob("*optim_states.pt"))
    state = torch.load(optim, weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]["state"]
    def tensors(d):  # bitsandbytes nests its quantisation state one level down
        for v in d.values():
            yield from tensors(v) if isinstance(v, dict) else ([v] if torch.is_tensor(v) else [])

    dtypes = {t.dtype for t in tensors(state)}
    assert torch.uint8 in dtypes, f"no 8-bit optimizer state in the checkpoint (dtypes {dtypes})"
    res = subprocess.run(_cmd(resumed, tiny_pairs_dir, tiny_pipeline_dir, *extra, "--resume"), cwd=REPO, env=_env(),
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _unet_bytes(resumed) == _unet_bytes(straight), "8-bit state did not survive the resume"
