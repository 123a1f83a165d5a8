"""What a MODEL argument points at: a run dir, a diffusers pipeline dir, or an export dir."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lftk.errors import LftkError
from lftk.runtime.layout import MANIFEST, MODEL_INDEX, PIPELINE_DIR, RUN_CONFIG, RUN_FINAL


@dataclass(frozen=True)
class ModelRef:
    kind: str  # "run" | "pipeline" | "export"
    path: Path  # the dir itself
    pipeline_dir: Path | None  # a diffusers pipeline dir inside it, when there is one


def resolve_model(ref: str | Path) -> ModelRef:
    path = Path(ref)
    if not path.exists():
        raise LftkError(f"{ref}: no such model dir (expected a run dir, a pipeline dir or an export dir)")
    if (path / MANIFEST).is_file():
        pipe = path / PIPELINE_DIR
        return ModelRef("export", path, pipe if (pipe / MODEL_INDEX).is_file() else None)
    if (path / MODEL_INDEX).is_file():
        return ModelRef("pipeline", path, path)
    if (path / RUN_CONFIG).is_file():
        final = path / RUN_FINAL
        if not (final / MODEL_INDEX).is_file():
            raise LftkError(f"{ref}: run has no final model yet (train it to the end, or pass a checkpoint's export)")
        return ModelRef("run", path, final)
    raise LftkError(
        f"{ref}: not a model dir: expected model_index.json (pipeline), manifest.json (export) "
        "or resolved_config.yaml (run)"
    )
