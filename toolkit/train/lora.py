"""LoRA adapters on the UNet (peft), chosen by module-name patterns from the recipe."""

from __future__ import annotations

import logging

from lftk.config import LoraConfig
from lftk.errors import LftkError, NotAvailableError

log = logging.getLogger(__name__)


def add_lora(unet, cfg: LoraConfig) -> None:
    """Freeze the UNet and add trainable adapters on modules whose names end with a target."""
    try:
        from peft import LoraConfig as PeftLoraConfig
    except ImportError as exc:
        raise NotAvailableError("train.trainable=lora needs peft: pip install 'lftk[train]'") from exc
    names = [n for n, _ in unet.named_modules()]
    missing = [t for t in cfg.targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise LftkError(f"train.lora.targets: no UNet module matches {missing}")
    unet.requires_grad_(False)
    unet.add_adapter(
        PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.targets, init_lora_weights="gaussian")
    )
    n = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    log.info("LoRA rank %d on %d target pattern(s): %.3f M trainable params", cfg.rank, len(cfg.targets), n / 1e6)


def save_lora(unet, cfg: LoraConfig, out_dir) -> None:
    """Adapters in diffusers' LoRA format, with their config so `load_lora_weights` scales by alpha/r
    (without the metadata it assumes alpha == r: stack.md)."""
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    peft_cfg = unet.peft_config["default"]
    StableDiffusionInstructPix2PixPipeline.save_lora_weights(
        str(out_dir), unet_lora_layers=layers, unet_lora_adapter_metadata=peft_cfg.to_dict(), safe_serialization=True
    )


def merged_copy(unet):
    """A plain UNet with the adapters folded into its weights (what export and stock loaders want)."""
    import copy

    merged = copy.deepcopy(unet)
    merged.fuse_lora()
    merged.unload_lora()
    return merged
