"""Engine plumbing on CPU, with a recording stand-in for the `tensorrt` module: which graph each
component's engine is built from, as which network (strongly typed, no precision flags: TensorRT 11
has none) and shape profile, the content-addressed
cache and the timing cache, and the manifest record `check_engines` reads. It checks lftk's calls,
not TensorRT: real builds and their parity are tests/test_trt.py (tier `trt`)."""

from __future__ import annotations

import shutil
import sys
import types

import pytest

from lftk.runtime.manifest import check_engines, verify_manifest, write_manifest
from lftk.runtime.precision import Format, Precision, target
from lftk.export.stages import Report

VERSION, CC = "10.9.0", "8.7"


class _Recorder:
    def __init__(self):
        self.builds = []  # (onnx path, network flags, builder flags, profile)


def _fake_tensorrt(rec: _Recorder):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = VERSION
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.BuilderFlag = types.SimpleNamespace(TF32="TF32", BF16="BF16")  # as in TensorRT 11.4: no FP16, no INT8
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.cache = [], [], None

        def set_memory_pool_limit(self, pool, size):
            assert pool == "WORKSPACE" and size > 0

        def set_flag(self, flag):
            self.flags.append(flag)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile.shapes)

        def create_timing_cache(self, data):
            return types.SimpleNamespace(data=bytes(data), serialize=lambda: b"timing")

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            self.network["path"] = path
            return True

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return {"flags": flags}

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            rec.builds.append((network["path"], network["flags"], list(config.flags), config.profiles[0]))
            return b"plan:" + network["path"].encode()

    trt.Builder, trt.OnnxParser = Builder, Parser
    return trt


@pytest.fixture()
def engines(tiny_export_dir, tiny_pairs_dir, tmp_path, monkeypatch):
    """An export with fp16 variants of every graph and an int8 UNet (Q/DQ), for engines built through the stand-in."""
    rec = _Recorder()
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(rec))
    monkeypatch.setenv("LFTK_TRT_CACHE", str(tmp_path / "cache"))
    export = tmp_path / "export"
    shutil.copytree(tiny_export_dir, export)
    manifest = verify_manifest(export)
    # Stand-in fp16 and int8 graphs (the fp32 bytes under their names): only the plumbing is under test.
    from lftk.runtime.manifest import file_record

    for name, comp in manifest["components"].items():
        shutil.copyfile(export / f"onnx/{name}.onnx", export / f"onnx/{name}.fp16.onnx")
        comp["variants"] = {"fp16": {"files": [file_record(export, f"onnx/{name}.fp16.onnx")]}}
    shutil.copyfile(export / "onnx/unet.onnx", export / "onnx/unet.int8.onnx")
    manifest["components"]["unet"]["variants"]["int8"] = {"files": [file_record(export, "onnx/unet.int8.onnx")]}
    write_manifest(export, manifest)
    return export, verify_manifest(export), rec


def test_int8_engines_come_from_the_right_graphs_as_strongly_typed_networks(engines):
    from lftk.export.tensorrt import build_engines

    export, manifest, rec = engines
    info = {"tensorrt": VERSION, "compute_capability": CC, "gpu": "stand-in"}
    record = build_engines(export, manifest, target(Format.TRT, Precision.INT8), info, Report())
    built = {p.rsplit("/", 1)[-1]: (flags, builder_flags, profile) for p, flags, builder_flags, profile in rec.builds}
    strongly_typed = 1 << 1  # NetworkDefinitionCreationFlag.STRONGLY_TYPED, no builder precision flags
    assert built["unet.int8.onnx"][:2] == (strongly_typed, [])  # explicit quantization: the Q/DQ graph's types
    assert built["vae_decoder.fp16.onnx"][:2] == (strongly_typed, [])  # not quantized: from the fp16 graph
    assert set(built) == {"unet.int8.onnx", "text_encoder.fp16.onnx", "vae_encoder.fp16.onnx", "vae_decoder.fp16.onnx"}
    # min batch 1 (a distilled student's one branch per frame), opt one frame's 3 guidance branches, max 16 frames
    assert built["unet.int8.onnx"][2]["sample"] == ((1, 8, 16, 16), (3, 8, 16, 16), (48, 8, 16, 16))
    assert built["text_encoder.fp16.onnx"][2]["input_ids"] == ((1, 77), (2, 77), (4, 77))
    assert record["components"]["unet"]["files"][0]["path"] == "trt/unet.int8.engine"
    assert record["components"]["vae_decoder"]["files"][0]["path"] == "trt/vae_decoder.int8.engine"
    assert (export / "trt/unet.int8.engine").read_bytes().startswith(b"plan:")
    manifest["engines"] = {"int8": record}
    write_manifest(export, manifest)
    assert check_engines(export, verify_manifest(export), "int8", VERSION, CC) == record


def test_the_cache_is_keyed_by_content_precision_gpu_and_version(engines, tmp_path):
    from lftk.export.tensorrt import build_engines, cache_key, timing_cache_path

    export, manifest, rec = engines
    info = {"tensorrt": VERSION, "compute_capability": CC, "gpu": "stand-in"}
    fp16 = target(Format.TRT, Precision.FP16)
    first = build_engines(export, manifest, fp16, info, Report())
    assert len(rec.builds) == 4 and timing_cache_path(info).read_bytes() == b"timing"
    report = Report()
    again = build_engines(export, manifest, fp16, info, report)
    assert len(rec.builds) == 4, "an identical request rebuilt an engine"
    assert all(s.note.startswith("cache hit") for s in report.stages)
    assert again["components"]["unet"]["cache_key"] == first["components"]["unet"]["cache_key"]
    build_engines(export, manifest, fp16, {**info, "compute_capability": "9.0"}, Report())
    assert len(rec.builds) == 8  # another GPU: new engines
    key = first["components"]["unet"]
    shapes = {n: tuple(map(tuple, s)) for n, s in key["profile"].items()}
    base = cache_key(key["onnx_sha256"], shapes, "fp16", CC, VERSION)
    assert base == key["cache_key"]
    assert len({base, cache_key("0" * 64, shapes, "fp16", CC, VERSION), cache_key(key["onnx_sha256"], shapes, "int8", CC, VERSION),
                cache_key(key["onnx_sha256"], shapes, "fp16", CC, "10.10.0")}) == 4
