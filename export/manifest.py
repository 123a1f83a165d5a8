"""manifest.json of an export dir: what was built, from what, with which tools, and content hashes.

A backend reads graphs only through `verify_manifest`, so a file changed after export (a partial
copy, a hand edit, a foreign graph dropped in) is refused with the command that rebuilds it,
never run. TensorRT engines will add precision, GPU arch and TensorRT version to the same record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from pathlib import Path

from lftk.errors import LftkError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "lftk-export/1"
ONNX_DIR = "onnx"
PIPELINE_DIR = "pipeline"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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


def write_manifest(export_dir: Path, manifest: dict) -> Path:
    """Write manifest.json atomically (a half-written manifest would refuse a good export)."""
    path = Path(export_dir) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"format": FORMAT, **manifest}, indent=2))
    tmp.replace(path)
    return path


def read_manifest(export_dir: Path) -> dict:
    path = Path(export_dir) / MANIFEST
    if not path.is_file():
        raise LftkError(f"{export_dir}: no {MANIFEST}: not an export dir (make one with `lftk export MODEL --onnx`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LftkError(f"{path}: unreadable manifest ({exc}); {rebuild_hint(export_dir, {})}") from None
    if manifest.get("format") != FORMAT:
        raise LftkError(
            f"{path}: manifest format {manifest.get('format')!r}, this lftk reads {FORMAT!r}; "
            f"{rebuild_hint(export_dir, manifest)}"
        )
    return manifest


def rebuild_hint(export_dir: Path, manifest: dict) -> str:
    """The exact command that rebuilds this export: from the source model if it is still there."""
    source = manifest.get("source")
    # The export's own pipeline/ copy always works, even when the source moved or was this very dir
    # (whose manifest a failed re-export has already removed).
    if not source or not Path(source).exists() or Path(source).resolve() == Path(export_dir).resolve():
        source = str(Path(export_dir) / PIPELINE_DIR)
    return f"rebuild with: lftk export {source} --onnx --out {export_dir}"


def verify_manifest(export_dir: Path) -> dict:
    """Recompute every recorded hash; raise LftkError naming the first file that differs."""
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    for name, comp in manifest.get("components", {}).items():
        for rec in comp["files"]:
            path = export_dir / rec["path"]
            if not path.is_file():
                raise LftkError(f"{path}: missing ({name} graph listed in {MANIFEST}); {rebuild_hint(export_dir, manifest)}")
            if path.stat().st_size != rec["bytes"] or sha256_file(path) != rec["sha256"]:
                raise LftkError(
                    f"{path}: content differs from {MANIFEST} (changed since export); refusing to run it; "
                    f"{rebuild_hint(export_dir, manifest)}"
                )
    log.debug("manifest of %s verified", export_dir)
    return manifest
