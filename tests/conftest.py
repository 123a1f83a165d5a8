"""Shared fixtures: tiny seeded components (diffusers' get_dummy_components idea), built once a session
and fed to training, export, runner and eval tests through the same save/load code users run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


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
