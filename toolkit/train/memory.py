"""`lftk train --dry-run`: will this recipe fit on this card? Per-rank GPU memory, by part.

The model is built on PyTorch's meta device (shapes only, no memory, no weights needed), so the
full SD 1.5 architecture is estimated in a second on any machine. Activations are measured, not
guessed: a forward pass on meta tensors with a saved-tensors hook adds up what autograd keeps
for backward at the recipe's batch and resolution, with or without gradient checkpointing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lftk.config import Recipe
from lftk.model.components import IP2P_IN_CHANNELS, preset_spec
from lftk.train.lora_parts import assign, lora_param_count

GIB = 2**30
# CUDA context, cuDNN/cuBLAS workspaces and allocator fragmentation: a stated allowance, not a measurement.
OVERHEAD_GIB = 1.5


@dataclass
class Estimate:
    arch: str
    rank_count: int
    trainable: int
    frozen: int
    rows: list[tuple[str, float, str]]  # (part, GiB, how)

    @property
    def total_gib(self) -> float:
        return sum(r[1] for r in self.rows)


def _configs(recipe: Recipe) -> tuple[str, dict, dict, dict]:
    """(arch label, unet config, vae config, text config): the base's own when it is local, else SD 1.5."""
    base = Path(recipe.model.base)
    if (base / "unet" / "config.json").is_file():
        load = lambda sub: {k: v for k, v in json.loads((base / sub / "config.json").read_text()).items() if not k.startswith("_")}  # noqa: E731
        return f"{base} (local configs)", load("unet"), load("vae"), load("text_encoder")
    spec = preset_spec("sd15")
    return f"SD 1.5 InstructPix2Pix (assumed for '{recipe.model.base}')", dict(spec.unet), dict(spec.vae), dict(spec.text)


def _meta_models(unet_cfg: dict, vae_cfg: dict, text_cfg: dict):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_cfg)
        vae = AutoencoderKL.from_config(vae_cfg)
        text = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in text_cfg.items() if k != "architectures"}))
    return unet, vae, text


def _lora_layers(model, recipe: Recipe, component: str) -> dict:
    """The layers the recipe's LoRA parts adapt on this (meta) model: the patterns are checked here too."""
    if recipe.train.trainable != "lora":
        return {}
    if component == "vae_encoder" and not recipe.train.vae_encoder_trains:
        return {}
    return assign(recipe.train.lora, component, model)


def _saved_bytes(model, run, adapted: dict | None, dtype: torch.dtype) -> int:
    """Bytes autograd keeps for backward while `run()` does one forward on meta tensors. With LoRA only the
    adapted layers' weights stand in as trainable: frozen layers keep no input for a weight gradient,
    adapters keep their (small) inputs, and nothing upstream of the first adapted layer is kept."""
    model.to(dtype)
    if adapted is not None:
        model.requires_grad_(False)
        layers = dict(model.named_modules())
        for name in adapted:
            layers[name].weight.requires_grad_(True)
    model.train()
    saved = [0]
    params = {id(p) for p in model.parameters()}

    def pack(x):
        # Weights (and their transposed views) saved for backward are already counted as weights.
        if id(x) not in params and id(getattr(x, "_base", None)) not in params:
            saved[0] += x.numel() * x.element_size()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        run()
    return saved[0]


def _activation_bytes(unet, recipe: Recipe, dtype: torch.dtype, vae_scale: int, adapted: dict) -> int:
    t = recipe.train
    if t.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    h = t.resolution // vae_scale
    b = t.batch_size
    sample = torch.empty(b, IP2P_IN_CHANNELS, h, h, device="meta", dtype=dtype, requires_grad=t.trainable == "lora")
    steps = torch.zeros(b, device="meta", dtype=torch.long)
    text = torch.empty(b, 77, unet.config.cross_attention_dim, device="meta", dtype=dtype)
    return _saved_bytes(unet, lambda: unet(sample, steps, text), adapted if t.trainable == "lora" else None, dtype)


def _encoder_activation_bytes(vae, recipe: Recipe, dtype: torch.dtype, adapted: dict) -> int:
    """The VAE encoder's kept activations when its tail trains: both frames of every pair go through it
    with gradients (without adapters it runs under no_grad, or not at all with cached latents)."""
    t = recipe.train
    pixels = torch.empty(2 * t.batch_size, 3, t.resolution, t.resolution, device="meta", dtype=dtype)  # current ‖ future
    return _saved_bytes(vae, lambda: vae.encode(pixels).latent_dist.mode(), adapted, dtype)


def estimate(recipe: Recipe, world: int = 1) -> Estimate:
    t = recipe.train
    arch, unet_cfg, vae_cfg, text_cfg = _configs(recipe)
    unet, vae, text = _meta_models(unet_cfg, vae_cfg, text_cfg)
    n_unet = sum(p.numel() for p in unet.parameters())
    n_other = sum(p.numel() for p in vae.parameters()) + sum(p.numel() for p in text.parameters())
    unet_lora, vae_lora = _lora_layers(unet, recipe, "unet"), _lora_layers(vae, recipe, "vae_encoder")
    n_train = n_unet if t.trainable == "full" else lora_param_count(unet, unet_lora) + lora_param_count(vae, vae_lora)
    n_frozen = n_other + (0 if t.trainable == "full" else n_unet)
    half = t.precision in ("fp16", "bf16")
    wb = 2 if half else 4
    shard_opt = world if t.zero_stage >= 1 else 1
    shard_grad = world if t.zero_stage >= 2 else 1
    shard_par = world if t.zero_stage == 3 else 1
    state_per_param = {"adamw": 8, "adamw8bit": 2, "paged_adamw8bit": 2}[t.optimizer] + (4 if half else 0)
    rows = [
        ("frozen weights (VAE, text encoder" + ("" if t.trainable == "full" else ", UNet base") + ")",
         n_frozen * wb / GIB, f"{n_frozen / 1e6:.0f} M x {wb} B"),
        ("trainable weights", 0.0 if t.offload_params else n_train * wb / shard_par / GIB,
         "offloaded to CPU" if t.offload_params else f"{n_train / 1e6:.1f} M x {wb} B / {shard_par}"),
        ("gradients", n_train * wb / shard_grad / GIB, f"{wb} B/param / {shard_grad} (ZeRO-{t.zero_stage})"),
        ("optimizer state" + (" + fp32 master" if half else ""),
         0.0 if t.offload_optimizer else n_train * state_per_param / shard_opt / GIB,
         "offloaded to CPU" if t.offload_optimizer else f"{state_per_param} B/param ({t.optimizer}) / {shard_opt}"),
    ]
    if recipe.distill is not None:  # the teacher's UNet, frozen (its 3-branch forward keeps no activations)
        rows.append(("teacher UNet (distill)", n_unet * wb / GIB, f"{n_unet / 1e6:.0f} M x {wb} B, frozen"))
    vae_scale = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    act = _activation_bytes(unet, recipe, torch.float16 if half else torch.float32, vae_scale, unet_lora)
    rows.append(("UNet activations", act / GIB, f"measured on meta: batch {t.batch_size}, {t.resolution} px"
                 + (", checkpointed" if t.gradient_checkpointing else "")))
    if vae_lora:
        enc = _encoder_activation_bytes(vae, recipe, torch.float16 if half else torch.float32, vae_lora)
        rows.append(("VAE encoder activations", enc / GIB,
                     f"measured on meta: {2 * t.batch_size} frames, {t.resolution} px, {len(vae_lora)} adapted layers"))
    rows.append(("CUDA context + fragmentation", OVERHEAD_GIB, "allowance"))
    return Estimate(arch, world, n_train, n_frozen, rows)


def format_estimate(est: Estimate, gpu_mem_gib: float | None) -> str:
    lines = [f"architecture: {est.arch}", f"per rank, {est.rank_count} rank(s); trainable {est.trainable / 1e6:.1f} M params", ""]
    width = max(len(r[0]) for r in est.rows)
    lines += [f"  {name:<{width}}  {gib:7.2f} GiB   {how}" for name, gib, how in est.rows]
    lines.append(f"  {'total':<{width}}  {est.total_gib:7.2f} GiB")
    if gpu_mem_gib:
        verdict = "fits" if est.total_gib <= gpu_mem_gib else "does NOT fit"
        lines.append(f"\n{verdict} a {gpu_mem_gib:g} GiB card ({gpu_mem_gib - est.total_gib:+.1f} GiB to spare)")
    return "\n".join(lines)
