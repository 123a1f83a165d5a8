"""One precision enum and one table of export targets (format x precision) that drives `lftk export`.

Each row says what an artifact is (format, precision, file suffix), where it is built and run,
which options it takes, which components it covers and what it is built from. The same table
validates the command line (`plan`), writes the `--precision` help (`precision_help`) and tells a
benchmark loop what an export dir holds (`targets_in`). Adding fp8 later means flipping its rows
to available and writing their builder, nothing else. Light on purpose (no torch): the CLI reads it
to write its help.

Components a row does not cover keep the row's `fallback` precision: an int8 export quantizes the
UNet, where nearly all the compute is, and keeps the text encoder and VAE at fp32 (ONNX) or fp16
(TensorRT), where 8-bit activations would cost visible quality for little speed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from lftk.errors import LftkError, NotAvailableError


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    FP8 = "fp8"

    @classmethod
    def parse(cls, value: "str | Precision") -> "Precision":
        try:
            return cls(str(getattr(value, "value", value)).lower())
        except ValueError:
            raise LftkError(f"unknown precision '{value}': choose one of {', '.join(p.value for p in cls)}") from None


class Format(str, enum.Enum):
    ONNX = "onnx"
    TRT = "trt"


OPTIONS = ("dynamic_shape", "calib")  # export options a row may accept, by their keyword names


@dataclass(frozen=True)
class Target:
    format: Format
    precision: Precision
    suffix: str  # file name = <component><suffix>
    backend: str  # the deploy backend that runs it
    build_on: str  # "cpu" | "gpu": what building it needs
    run_on: str  # "cpu+gpu" | "gpu": where it is meant to run
    options: frozenset  # subset of OPTIONS it accepts
    components: tuple | None  # components built at `precision` (None: all); the rest use `fallback`
    fallback: Precision
    source: tuple  # (format, precision) of the artifact it is built from; () = from torch
    note: str
    available: bool = True
    fallback_source: tuple = ()  # what the components it does not cover are built from; () = the fp32 graphs

    def source_of(self, component: str) -> tuple:
        """(format, precision) of the artifact this row builds `component` from."""
        if self.covers(component):
            return self.source
        return self.fallback_source or (Format.ONNX, Precision.FP32)

    @property
    def key(self) -> str:
        return f"{self.format.value}:{self.precision.value}"

    def filename(self, component: str) -> str:
        return f"{component}{self.suffix}"

    def covers(self, component: str) -> bool:
        return self.components is None or component in self.components

    def precision_of(self, component: str) -> Precision:
        return self.precision if self.covers(component) else self.fallback


_ALL = None  # every component
_ONNX, _TRT = Format.ONNX, Format.TRT
P = Precision

TARGETS: tuple[Target, ...] = (
    Target(_ONNX, P.FP32, ".onnx", "ort", "cpu", "cpu+gpu", frozenset({"dynamic_shape"}), _ALL, P.FP32, (),
           "reference graphs; parity against torch"),
    Target(_ONNX, P.FP16, ".fp16.onnx", "ort", "cpu", "gpu", frozenset({"dynamic_shape"}), _ALL, P.FP32,
           (_ONNX, P.FP32), "for onnxruntime GPU providers (fp32 inputs/outputs, fp16 inside)"),
    Target(_ONNX, P.INT8, ".int8.onnx", "ort", "cpu", "cpu+gpu", frozenset({"dynamic_shape", "calib"}), ("unet",),
           P.FP32, (_ONNX, P.FP32), "explicit Q/DQ, symmetric int8, calibrated on training frames"),
    Target(_ONNX, P.FP8, ".fp8.onnx", "ort", "cpu", "gpu", frozenset({"dynamic_shape", "calib"}), ("unet",),
           P.FP32, (_ONNX, P.FP32), "FP8 E4M3 Q/DQ", available=False),
    # TensorRT networks are strongly typed (TensorRT 11 has no other mode): each engine is built from a
    # graph that carries its precision, never from the fp32 graph with a precision flag.
    Target(_TRT, P.FP16, ".fp16.engine", "trt", "gpu", "gpu", frozenset({"dynamic_shape"}), _ALL, P.FP16,
           (_ONNX, P.FP16), "TensorRT, strongly typed from the fp16 graphs"),
    Target(_TRT, P.INT8, ".int8.engine", "trt", "gpu", "gpu", frozenset({"dynamic_shape", "calib"}), ("unet",),
           P.FP16, (_ONNX, P.INT8), "TensorRT, explicit quantization from the Q/DQ graph", fallback_source=(_ONNX, P.FP16)),
    Target(_TRT, P.FP8, ".fp8.engine", "trt", "gpu", "gpu", frozenset({"dynamic_shape", "calib"}), ("unet",),
           P.FP16, (_ONNX, P.FP8), "TensorRT FP8, compute capability >= 8.9", available=False,
           fallback_source=(_ONNX, P.FP16)),
)


def target(fmt: Format | str, precision: Precision | str) -> Target:
    fmt, precision = Format(fmt), Precision.parse(precision)
    for row in TARGETS:
        if row.format == fmt and row.precision == precision:
            return row
    offered = ", ".join(r.precision.value for r in TARGETS if r.format == fmt and r.available)
    raise LftkError(f"no {fmt.value} export at {precision.value}: {fmt.value} offers {offered}")


def _require_available(row: Target) -> Target:
    if not row.available:
        raise NotAvailableError(f"{row.key} ({row.note}) is planned, not available in this version")
    return row


def plan(precision: Precision | str, onnx: bool, trt: bool, dynamic_shape: bool = False, calib: bool = False) -> list[Target]:
    """The targets one `lftk export` builds, in order (sources before what is built from them).

    Raises LftkError for a combination the table does not allow, naming the option and the rows
    that would accept it.
    """
    precision = Precision.parse(precision)
    wanted = []
    if onnx:
        wanted.append(target(_ONNX, P.FP32))
    # --no-onnx keeps the fp32 graphs of an existing export; a precision asked for without --trt
    # is then a variant added to it.
    if precision != P.FP32 and (onnx or not trt):
        wanted.append(target(_ONNX, precision))
    if trt:
        wanted.append(target(_TRT, precision))
    if not wanted:
        return []
    for row in wanted:
        _require_available(row)
    # Sources a row is built from come first (an int8 engine needs the int8 graph; --no-onnx
    # reuses the fp32 graphs of an existing export, but a derived graph is made if missing).
    ordered: list[Target] = []
    for row in wanted:
        for source in (row.source, row.fallback_source):
            if source and source != (_ONNX, P.FP32):
                src = _require_available(target(*source))
                if src not in ordered:
                    ordered.append(src)
        if row not in ordered:
            ordered.append(row)
    requested = {"dynamic_shape": dynamic_shape, "calib": calib}
    for name, given in requested.items():
        if given and not any(name in row.options for row in ordered if row.precision == precision):
            takers = sorted({r.precision.value for r in TARGETS if name in r.options and r.available})
            flag = "--" + name.replace("_", "-")
            raise LftkError(f"{flag} does not apply to --precision {precision.value}: it is for {', '.join(takers)}")
    return ordered


def precision_help() -> str:
    """The --precision help text, written from the table."""
    parts = []
    for p in Precision:
        rows = [r for r in TARGETS if r.precision == p]
        if not any(r.available for r in rows):
            parts.append(f"{p.value} (planned)")
            continue
        where = ", ".join(f"{r.format.value} {r.suffix}" + (" [GPU]" if "cpu" not in r.run_on else "") for r in rows if r.available)
        parts.append(f"{p.value}: {where}")
    return "Precision (artifacts; [GPU]: runs on GPUs only). " + "; ".join(parts) + "."


def targets_in(manifest: dict) -> list[Target]:
    """The rows whose artifacts an export's manifest lists: what a benchmark loop can run."""
    found = []
    comps = manifest.get("components", {})
    for row in TARGETS:
        if row.format == _ONNX:
            if row.precision == P.FP32:
                have = bool(comps)
            else:
                covered = [c for c in comps if row.covers(c)]
                have = bool(covered) and all(row.precision.value in comps[c].get("variants", {}) for c in covered)
        else:
            have = row.precision.value in manifest.get("engines", {})
        if have and row.available:
            found.append(row)
    return found
