"""`lftk doctor` on this machine: what it has, said plainly, and TensorRT found however it was installed."""

from __future__ import annotations

import importlib.util
import sys
import types

import torch
from typer.testing import CliRunner

from lftk import doctor
from lftk.cli import app


def test_doctor_runs_and_names_the_machine():
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "python" in result.output and "onnxruntime" in result.output and "can run:" in result.output
    if not torch.cuda.is_available():
        assert "none: this is a CPU machine" in result.output
        assert "TensorRT engines: no" in result.output


def test_tensorrt_is_found_without_pip_metadata_and_a_broken_one_is_reported(monkeypatch):
    # JetPack's TensorRT is a Debian package: importable, no pip distribution to ask for a version.
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.3.0"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "tensorrt" else real_find(name, *a))
    assert doctor._tensorrt() == ("10.3.0", None)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails: e.g. a wheel without its CUDA libraries
    version, why = doctor._tensorrt()
    assert version is None and "does not load" in why
