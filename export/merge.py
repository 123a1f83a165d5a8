"""Merge a run's LoRA adapters into its base: a plain diffusers pipeline dir that export and stock
loaders read. Idempotent (litgpt's merge_lora): a dir without adapters is already merged, and
merging it again is a success that says so, not an error.

A LoRA run's final/ holds both the adapters (final/lora/pytorch_lora_weights.safetensors, saved
with their alpha/rank metadata, and, when the VAE encoder trained too, final/lora/vae_encoder/ in
peft's format) and a UNet (and VAE) merged at the end of training. The merge rebuilds the merged
weights from their sources (the base named in final/lftk_model.json plus the adapters) through
stock loaders (diffusers' load_lora_weights, peft's PeftModel), and checks the result against
final/'s UNet and VAE: a base that changed since training, or adapters saved without their scale,
show up here as a difference.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from lftk.errors import LftkError
from lftk.model.base import LFTK_META, load_pipeline, looks_like_hub_id, read_meta, write_meta
from lftk.model.resolve import resolve_model
from lftk.runtime.layout import LORA_DIR
from lftk.train.lora import VAE_ADAPTER_DIR  # lora/vae_encoder/: the VAE-encoder adapter, peft format

log = logging.getLogger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"
MERGE_ATOL = 1e-4  # fused (base + B·A·alpha/r) vs final/'s UNet; float rounding is ~1e-7


@dataclass(frozen=True)
class MergeResult:
    pipeline_dir: Path  # the merged pipeline: `out`, or the input itself when it had nothing to merge
    merged: bool  # False: already merged (no adapters), nothing written
    message: str
    max_abs_diff: float | None = None  # fused UNet (and VAE) vs the source's merged ones


def adapters_of(pipeline_dir: Path) -> Path | None:
    """The LoRA weights file of a pipeline dir, or None when it holds no adapters."""
    path = Path(pipeline_dir) / LORA_DIR / LORA_FILE
    return path if path.is_file() else None


def _base_dir(base: str, pipeline_dir: Path) -> str:
    """The base named in lftk_model.json: a hub id, an absolute dir, or a dir relative to where
    training ran (the cwd, usually the project root) or to the run's own parents."""
    path = Path(base)
    if path.is_absolute():
        return base  # load_pipeline says so if it is gone
    for root in (Path.cwd(), *Path(pipeline_dir).resolve().parents):
        if (root / path / "model_index.json").is_file():
            return str(root / path)
    if looks_like_hub_id(base):
        return base  # a hub id (owner/name): load_pipeline loads it from the cache or explains
    raise LftkError(
        f"base model {base!r} ({Path(pipeline_dir) / LFTK_META} 'base') not found from {Path.cwd()} "
        "or the run's parent dirs: run from the dir training ran in, or fix 'base' to an absolute path"
    )


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str = "UNet") -> float:
    if a.keys() != b.keys():
        only = sorted(a.keys() ^ b.keys())[:3]
        raise LftkError(f"merged {what} and final {what} have different parameters (e.g. {only})")
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _merge_vae_adapter(pipe, adapter_dir: Path) -> None:
    """Fold a peft VAE-encoder adapter into pipe.vae the way stock peft loads it."""
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise LftkError(f"{adapter_dir}: merging the VAE-encoder adapter needs peft: pip install 'lftk[train]'") from exc
    try:
        pipe.vae = PeftModel.from_pretrained(pipe.vae, str(adapter_dir)).merge_and_unload()
    except (ValueError, KeyError, RuntimeError) as exc:
        raise LftkError(f"{adapter_dir}: VAE adapter does not fit the base VAE: {exc}") from exc


def merge_run(model: str | Path, out: str | Path, atol: float = MERGE_ATOL) -> MergeResult:
    """Merge MODEL's adapters (MODEL: run dir or pipeline dir) into a pipeline dir at OUT.

    Already merged (no lora/ adapters: a full fine-tune, a merged dir, a stock pipeline): nothing
    is written and the result points at MODEL's pipeline dir.
    """
    ref = resolve_model(model)
    if ref.pipeline_dir is None:
        raise LftkError(f"{model}: no pipeline dir to merge")
    src = ref.pipeline_dir
    weights = adapters_of(src)
    if weights is None:
        msg = f"already merged: {src} holds no LoRA adapters ({LORA_DIR}/{LORA_FILE}); nothing to do"
        return MergeResult(src, False, msg)
    meta = read_meta(src)
    if not meta.get("base"):
        raise LftkError(f"{src / LFTK_META}: no 'base' recorded: cannot tell which model the adapters adapt")
    base = _base_dir(str(meta["base"]), src)

    try:
        pipe = load_pipeline(base)
    except LftkError as exc:
        raise LftkError(f"base model of {src} ({LFTK_META} 'base'): {exc}") from exc
    try:
        pipe.load_lora_weights(str(weights.parent), weight_name=LORA_FILE)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise LftkError(f"{weights}: adapters do not fit base {base}: {exc}") from exc
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    vae_adapter = weights.parent / VAE_ADAPTER_DIR
    if vae_adapter.is_dir():
        _merge_vae_adapter(pipe, vae_adapter)
    final = load_pipeline(src)
    diffs = {"UNet": _max_abs_diff(pipe.unet.state_dict(), final.unet.state_dict())}
    if vae_adapter.is_dir():
        diffs["VAE"] = _max_abs_diff(pipe.vae.state_dict(), final.vae.state_dict(), "VAE")
    for what, d in diffs.items():
        if not d <= atol:  # NaN fails too
            raise LftkError(
                f"base {base} + adapters {weights.parent} differ from {src}'s merged {what} by {d:.3g} (> {atol:g}): "
                "the base changed since training, or the adapters lack their alpha/rank metadata"
            )
    diff = max(diffs.values())

    out = Path(out)
    if out.resolve() == src.resolve():
        raise LftkError(f"merge output {out} is the source dir itself: choose another OUT")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-merge-"))
    try:
        pipe.save_pretrained(str(tmp))
        # What training knew (resolution, horizon, prompt template, LoRA settings) travels along.
        merged_lora = {"adapters": str(weights), "base": base, "max_abs_diff_vs_source": diff}
        if vae_adapter.is_dir():
            merged_lora["vae_adapter"] = str(vae_adapter)
        write_meta(tmp, {**meta, "merged_lora": merged_lora})
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    msg = f"merged {LORA_DIR}/ adapters into base {base} -> {out} (max abs diff vs {src.name}/ {' and '.join(diffs)} {diff:.1e})"
    log.debug(msg)
    return MergeResult(out, True, msg, diff)
