"""Shared fixtures: tiny seeded components (diffusers' get_dummy_components idea), built once a session
and fed to training, export, runner and eval tests through the same save/load code users run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _root_log_handlers():
    """An in-process CLI call points the root logger at the sys.stderr of that moment, which pytest's
    capture closes after the test; later tests' log lines would then raise 'I/O operation on closed file'."""
    import logging

    root = logging.getLogger()
    saved = root.handlers[:]
    yield
    root.handlers[:] = saved


DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env(**extra: str) -> dict:
    """The environment for a CLI subprocess: without the torch.distributed variables that an
    in-process training test leaves behind (its port stays bound while pytest lives)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return {**env, **extra}


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A saved tiny InstructPix2Pix pipeline (random weights, real CLIP tokenizer)."""
    from lftk.model.base import assemble_pipeline, write_meta
    from lftk.model.components import build_components
    from lftk.model.tokenizer import build_clip_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    parts = build_components("tiny", seed=0)
    tokenizer = build_clip_tokenizer(root / "tok")
    pipe = assemble_pipeline(parts["unet"], parts["vae"], parts["text_encoder"], tokenizer)
    out = root / "pipeline"
    pipe.save_pretrained(str(out))
    write_meta(out, {"preset": "tiny", "resolution": 64, "prompt_template": "{instruction}"})
    return out


def write_pair_dir(root: Path, counts: dict[str, int], size: int = 64, seed: int = 0) -> Path:
    """A pair dir in the InstructPix2Pix sample format with smooth random frames (fast to write)."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for i in range(n):
            d = root / split / f"task__episode{i}__f0000"
            d.mkdir(parents=True)
            base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            for k in (0, 1):
                img = Image.fromarray(np.roll(base, k, axis=1)).resize((size, size), Image.BILINEAR)
                img.save(d / f"000000_{k}.jpg", quality=95)
            (d / "prompt.json").write_text(json.dumps({"instruction": "stack blocks", "horizon": 10, "task": "task"}))
    (root / "pairs.json").write_text(json.dumps({"horizon": 10}))
    return root


@pytest.fixture(scope="session")
def tiny_pairs_dir(tmp_path_factory) -> Path:
    return write_pair_dir(tmp_path_factory.mktemp("pairs") / "pairs", {"train": 8, "val": 2, "test": 2})


@pytest.fixture(scope="session")
def tiny_export_dir(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """The tiny pipeline exported to ONNX (four graphs, parity checked, manifest), once a session.
    Read-only for tests: copy it (shutil.copytree) before changing anything in it."""
    from lftk.export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("export") / "tiny_onnx"
    export_onnx(tiny_pipeline_dir, out)
    return out


@pytest.fixture(scope="module")
def torch_runner(tiny_pipeline_dir):
    """A Runner over the tiny pipeline's torch backend, fresh for each test module."""
    from lftk.runtime.backends import TorchBackend
    from lftk.runtime.runner import Runner

    return Runner.from_backend(TorchBackend(tiny_pipeline_dir))


@pytest.fixture(scope="session")
def lora_run(tiny_pipeline_dir, tiny_pairs_dir, tmp_path_factory) -> Path:
    """A LoRA run dir as `lftk train` leaves it, without training: final/ with the merged UNet,
    final/lora/ adapters (random, non-zero, saved with their alpha/rank), lftk_model.json naming the
    base, and resolved_config.yaml naming the training pairs. Read-only for tests."""
    import torch
    import yaml

    from lftk.config import LoraConfig
    from lftk.model.base import load_pipeline, read_meta, write_meta
    from lftk.train.lora import add_lora, merged_copy, save_lora

    run = tmp_path_factory.mktemp("lora_run") / "run"
    final = run / "final"
    pipe = load_pipeline(tiny_pipeline_dir)
    cfg = LoraConfig(rank=4, alpha=8.0)
    add_lora(pipe.unet, cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # gaussian init leaves B = 0 (a no-op adapter): make it do something
        for name, param in pipe.unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    save_lora(pipe.unet, cfg, final / "lora")
    pipe.unet = merged_copy(pipe.unet)
    pipe.save_pretrained(str(final))
    write_meta(final, {
        **read_meta(tiny_pipeline_dir), "base": str(tiny_pipeline_dir), "trainable": "lora",
        "lora": cfg.model_dump(), "resolution": 64, "horizon": 10, "prompt_template": "Scene after '{instruction}'",
    })
    (run / "resolved_config.yaml").write_text(yaml.safe_dump({"data": {"path": str(tiny_pairs_dir)}, "model": {"base": str(tiny_pipeline_dir)}}))
    return run
