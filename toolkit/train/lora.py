"""LoRA adapters (peft) on the UNet and, optionally, the tail of the VAE encoder, per recipe part.

Each component gets one peft adapter: the union of its parts' layers, with per-module rank and alpha
in the adapter's own config (lftk.train.lora_parts). Saved so that stock tools load them:

  final/lora/pytorch_lora_weights.safetensors   UNet, diffusers' LoRA format with its peft config as
                                                metadata: `pipe.load_lora_weights("final/lora")`
  final/lora/vae_encoder/                       VAE encoder, peft format (adapter_config.json +
                                                adapter_model.safetensors):
      vae = PeftModel.from_pretrained(AutoencoderKL.from_pretrained(BASE, subfolder="vae"),
                                      "final/lora/vae_encoder").merge_and_unload()
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from lftk.config import LoraConfig
from lftk.errors import LftkError, NotAvailableError
from lftk.train.lora_parts import COMPONENT_LABEL, ModuleLora, assign, peft_kwargs

log = logging.getLogger(__name__)

VAE_ADAPTER_DIR = "vae_encoder"
PEFT_WEIGHTS = "adapter_model.safetensors"
# PeftModel.from_pretrained loads into PeftModel(model): its keys carry the wrapper's prefix.
PEFT_PREFIX = "base_model.model."


class UnetAndVae(torch.nn.Module):
    """The engine's module when the VAE encoder carries adapters: DeepSpeed then holds, steps and
    checkpoints both. Calling it is calling the UNet, so the objective runs either module alike."""

    def __init__(self, unet: torch.nn.Module, vae: torch.nn.Module):
        super().__init__()
        self.unet = unet  # first: next(module.parameters()) is a UNet weight (its device and dtype)
        self.vae = vae

    def forward(self, *args, **kwargs):
        return self.unet(*args, **kwargs)


def split_trained(module: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """(unet, vae or None) of the engine's module."""
    return (module.unet, module.vae) if isinstance(module, UnetAndVae) else (module, None)


def _add(model: torch.nn.Module, component: str, cfg: LoraConfig) -> dict[str, ModuleLora]:
    try:
        from peft import LoraConfig as PeftLoraConfig
    except ImportError as exc:
        raise NotAvailableError("train.trainable=lora needs peft: pip install 'lftk[train]'") from exc
    assigned = assign(cfg, component, model)
    model.requires_grad_(False)
    model.add_adapter(PeftLoraConfig(**peft_kwargs(assigned)))
    _check_and_set_dropout(model, assigned, component)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    parts = sorted({m.part for m in assigned.values()})
    log.info("LoRA on the %s: %d layers in part(s) %s, %.3f M trainable params",
             COMPONENT_LABEL[component], len(assigned), ", ".join(parts), n / 1e6)
    return assigned


def _check_and_set_dropout(model, assigned: dict[str, ModuleLora], component: str) -> None:
    """peft adapted exactly the assigned layers at their rank and scale (a guard against pattern-semantics
    drift between peft versions), and each layer drops out at its part's rate (peft has one per adapter)."""
    from peft.tuners.lora import LoraLayer

    adapted = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    if set(adapted) != set(assigned):
        extra, missing = sorted(set(adapted) - set(assigned))[:3], sorted(set(assigned) - set(adapted))[:3]
        raise LftkError(f"peft adapted other {COMPONENT_LABEL[component]} layers than the recipe's parts (extra {extra}, missing {missing})")
    for name, want in assigned.items():
        layer = adapted[name]
        if layer.r["default"] != want.rank or abs(layer.scaling["default"] - want.alpha / want.rank) > 1e-9:
            raise LftkError(f"peft gave {name} rank {layer.r['default']}, scale {layer.scaling['default']}; "
                            f"part '{want.part}' asks rank {want.rank}, scale {want.alpha / want.rank}")
        layer.lora_dropout["default"] = torch.nn.Dropout(want.dropout) if want.dropout > 0 else torch.nn.Identity()


def add_lora(unet, cfg: LoraConfig) -> dict[str, ModuleLora]:
    """Freeze the UNet and add one adapter over its parts' layers; returns the module assignment."""
    return _add(unet, "unet", cfg)


def add_vae_lora(vae, cfg: LoraConfig) -> dict[str, ModuleLora]:
    """Freeze the VAE and add one adapter over its encoder parts' layers (never the decoder)."""
    return _add(vae, "vae_encoder", cfg)


def save_lora(unet, cfg: LoraConfig, out_dir, vae=None) -> None:
    """UNet adapters in diffusers' LoRA format, with their peft config as metadata so `load_lora_weights`
    scales each module by its own alpha/r (without the metadata diffusers assumes alpha == r and scales wrongly);
    VAE-encoder adapters, when there are any, in peft's format under out_dir/vae_encoder."""
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    peft_cfg = unet.peft_config["default"]
    StableDiffusionInstructPix2PixPipeline.save_lora_weights(
        str(out_dir), unet_lora_layers=layers, unet_lora_adapter_metadata=peft_cfg.to_dict(), safe_serialization=True
    )
    if vae is not None:
        save_peft_adapter(vae, Path(out_dir) / VAE_ADAPTER_DIR)


def save_peft_adapter(model, out_dir: Path) -> None:
    """What `PeftModel.save_pretrained` writes (adapter_config.json + adapter_model.safetensors), from a
    model that carries the adapter in place (diffusers' add_adapter) rather than inside a PeftModel."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    model.peft_config["default"].save_pretrained(str(out_dir))
    state = {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, str(out_dir / PEFT_WEIGHTS))


def merged_copy(model):
    """A plain model with the adapters folded into its weights (what export and stock loaders want)."""
    merged = copy.deepcopy(model)
    merged.fuse_lora()
    merged.unload_lora()
    return merged


def lora_summary(cfg: LoraConfig, assigned: dict[str, dict[str, ModuleLora]], model_of: dict) -> dict:
    """What lftk_model.json records per part: component, patterns, rank/alpha/dropout, layers, adapter file."""
    from lftk.train.lora_parts import summary

    files = {"unet": "lora/pytorch_lora_weights.safetensors", "vae_encoder": f"lora/{VAE_ADAPTER_DIR}"}
    parts = cfg.resolved_parts()
    out = {}
    for component, modules in assigned.items():
        layers = dict(model_of[component].named_modules())
        for name, row in summary(modules).items():
            params = sum(p.numel() for n, m in modules.items() if m.part == name
                         for k, p in layers[n].named_parameters() if "lora_" in k)
            out[name] = {"component": component, "targets": parts[name].targets, **row, "params": params,
                         "adapter": files[component]}
    return out
