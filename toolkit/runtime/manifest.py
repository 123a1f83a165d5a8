"""manifest.json of an export dir: what was built, from what, with which tools, and content hashes.

A backend reads an export only through `verify_manifest`, so a file changed after export (a partial
copy, a hand edit, a foreign graph dropped in, an edited scheduler config) is refused with the
command that rebuilds it, never run: the manifest hashes every graph, variant and engine and every
file of the `pipeline/` copy the runtime reads (tokenizer, scheduler, configs, weights). The manifest
carries a digest of its own content, so an edited manifest is refused too, and so is one without it.

Layout beyond the fp32 graphs (`components.<name>.files`):
    components.<name>.variants.<precision>   derived ONNX graphs (fp16, int8 Q/DQ): files, source hash
    engines.<precision>                      TensorRT engines: TensorRT version, GPU compute capability,
                                             and per component the engine file and the graph it came from
`check_engines` refuses engines built for another GPU, another TensorRT or another graph.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from pathlib import Path

from lftk import atomic
from lftk.atomic import sha256_file
from lftk.errors import LftkError
from lftk.runtime.layout import MANIFEST, ONNX_DIR, PIPELINE_DIR, TRT_DIR  # noqa: F401 (the export layout, re-exported)

log = logging.getLogger(__name__)

FORMAT = "lftk-export/1"


def tool_versions() -> dict:
    import onnx
    import onnxruntime
    import torch

    import lftk

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "lftk": lftk.__version__,
    }
    for name in ("diffusers", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:  # a runtime-only box may lack them; the record still stands
            versions[name] = None
    return versions


def file_record(export_dir: Path, rel: str) -> dict:
    path = Path(export_dir) / rel
    return {"path": rel, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def pipeline_records(export_dir: Path) -> list[dict]:
    """A file record for every file under the export's pipeline/ copy."""
    root = Path(export_dir) / PIPELINE_DIR
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return [file_record(export_dir, p.relative_to(export_dir).as_posix()) for p in files]


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's content (keys sorted, the digest itself left out)."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(export_dir: Path, manifest: dict) -> Path:
    """Write manifest.json atomically (a half-written manifest would refuse a good export), with its digest."""
    path = Path(export_dir) / MANIFEST
    body = {"format": FORMAT, **{k: v for k, v in manifest.items() if k not in ("format", "digest")}}
    body["digest"] = manifest_digest(body)
    atomic.write_text(path, json.dumps(body, indent=2))
    return path


def read_manifest(export_dir: Path) -> dict:
    path = Path(export_dir) / MANIFEST
    if not path.is_file():
        raise LftkError(f"{export_dir}: no {MANIFEST}: not an export dir (make one with `lftk export MODEL --onnx`)")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LftkError(f"{path}: unreadable manifest ({exc}); {rebuild_hint(export_dir, {})}") from None
    if not isinstance(manifest, dict):
        raise LftkError(f"{path}: not a manifest (a JSON object); {rebuild_hint(export_dir, {})}")
    if manifest.get("format") != FORMAT:
        raise LftkError(
            f"{path}: manifest format {manifest.get('format')!r}, this lftk reads {FORMAT!r}; "
            f"{rebuild_hint(export_dir, manifest)}"
        )
    if "digest" not in manifest or "pipeline_files" not in manifest:
        missing = "its digest" if "digest" not in manifest else "the hashes of its pipeline/ files"
        raise LftkError(
            f"{path}: the manifest lacks {missing} (removed, or written by an older lftk), so the export cannot be "
            f"verified; refusing it; {rebuild_hint(export_dir, manifest)}"
        )
    if manifest["digest"] != manifest_digest(manifest):
        raise LftkError(
            f"{path}: edited after export (its digest does not match its content); refusing the export; "
            f"{rebuild_hint(export_dir, manifest)}"
        )
    return manifest


def export_flags(options: dict) -> str:
    """The command-line flags of recorded export options (manifest `options`)."""
    flags = []
    if options.get("precision", "fp32") != "fp32":
        flags.append(f"--precision {options['precision']}")
    if options.get("dynamic_shape"):
        flags.append("--dynamic-shape")
    if options.get("calib"):
        flags.append(f"--calib {options['calib']}")
    if options.get("trt"):
        flags.append("--trt")
    return " ".join(flags)


def rebuild_hint(export_dir: Path, manifest: dict) -> str:
    """The exact command that rebuilds this export: from the source model if it is still there."""
    source = manifest.get("source")
    # The export's own pipeline/ copy always works, even when the source moved or was this very dir
    # (whose manifest a failed re-export has already removed).
    if not source or not Path(source).exists() or Path(source).resolve() == Path(export_dir).resolve():
        source = str(Path(export_dir) / PIPELINE_DIR)
    flags = export_flags(manifest.get("options", {}))
    hint = f"rebuild with: lftk export {source} --onnx {flags + ' ' if flags else ''}--out {export_dir}"
    for added in manifest.get("additions", []):  # precisions added later with --no-onnx
        hint += f"; then lftk export {export_dir} --no-onnx {export_flags(added)} --out {export_dir}"
    return hint


def engine_hint(export_dir: Path, precision: str) -> str:
    """The command that (re)builds the engines of one precision from the export's own graphs, on this machine."""
    return f"rebuild with: lftk export {export_dir} --no-onnx --trt --precision {precision} --out {export_dir}"


def file_records(manifest: dict):
    """(what, record) for every file the manifest lists: fp32 graphs, variants, engines, pipeline/ files."""
    for rec in manifest.get("pipeline_files", []):
        yield "pipeline file", rec
    for name, comp in manifest.get("components", {}).items():
        for rec in comp.get("files", []):
            yield f"{name} graph", rec
        for precision, var in comp.get("variants", {}).items():
            for rec in var.get("files", []):
                yield f"{name} {precision} graph", rec
    for precision, eng in manifest.get("engines", {}).items():
        for name, rec in eng.get("components", {}).items():
            for f in rec.get("files", []):
                yield f"{name} {precision} engine", f


def graph_sha256(records: list[dict]) -> str:
    """Content hash of one graph: its file's sha256, or a hash over its files' (graph + external data)."""
    if len(records) == 1:
        return records[0]["sha256"]
    return hashlib.sha256("\n".join(r["sha256"] for r in records).encode()).hexdigest()


def component_files(manifest: dict, component: str, precision: str = "fp32") -> list[dict]:
    """The ONNX file records a backend loads for `component` at `precision`: the variant when the
    export has one, else the fp32 graph (an int8 export quantizes the UNet only)."""
    comp = manifest["components"][component]
    variant = comp.get("variants", {}).get(precision)
    return variant["files"] if variant else comp["files"]


def check_engines(export_dir: Path, manifest: dict, precision: str, tensorrt_version: str, compute_capability: str) -> dict:
    """The engine record of `precision` if it was built for this TensorRT and GPU from the graphs the
    manifest lists now; LftkError with the rebuild command otherwise. File hashes: `verify_manifest`."""
    engines = manifest.get("engines", {}).get(precision)
    hint = engine_hint(export_dir, precision)
    if not engines:
        built = ", ".join(manifest.get("engines", {})) or "none"
        raise LftkError(f"{export_dir}: no TensorRT {precision} engines (built: {built}); {hint}")
    if engines.get("tensorrt") != tensorrt_version:
        raise LftkError(
            f"{export_dir}: {precision} engines were built with TensorRT {engines.get('tensorrt')}, this machine has "
            f"{tensorrt_version}; engines do not move between TensorRT versions; {hint}"
        )
    if engines.get("compute_capability") != compute_capability:
        raise LftkError(
            f"{export_dir}: {precision} engines were built for compute capability {engines.get('compute_capability')} "
            f"({engines.get('gpu')}), this GPU is {compute_capability}; engines are GPU-specific; {hint}"
        )
    for name, rec in engines.get("components", {}).items():
        if name not in manifest.get("components", {}):
            raise LftkError(f"{export_dir}: {precision} engine for unknown component {name}; {hint}")
        graph = component_files(manifest, name, rec.get("graph_precision", "fp32"))
        if graph_sha256(graph) != rec.get("onnx_sha256"):
            raise LftkError(f"{export_dir}: {name} {precision} engine was built from another {graph[0]['path']}; {hint}")
    return engines


def verify_manifest(export_dir: Path) -> dict:
    """Recompute every recorded hash; raise LftkError naming the first file that differs."""
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    for what, rec in file_records(manifest):
        path = export_dir / rec["path"]
        hint = engine_hint(export_dir, what.split()[1]) if what.endswith("engine") else rebuild_hint(export_dir, manifest)
        if not path.is_file():
            raise LftkError(f"{path}: missing ({what} listed in {MANIFEST}); {hint}")
        if path.stat().st_size != rec["bytes"] or sha256_file(path) != rec["sha256"]:
            raise LftkError(f"{path}: content differs from {MANIFEST} (changed since export); refusing to run it; {hint}")
    listed = {rec["path"] for rec in manifest.get("pipeline_files", [])}
    extra = [p for p in sorted((export_dir / PIPELINE_DIR).rglob("*")) if p.is_file() and p.relative_to(export_dir).as_posix() not in listed]
    if extra:
        raise LftkError(f"{extra[0]}: not in {MANIFEST} (added since export); refusing the export; {rebuild_hint(export_dir, manifest)}")
    log.debug("manifest of %s verified", export_dir)
    return manifest
