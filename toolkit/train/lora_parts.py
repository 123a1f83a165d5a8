"""Which layers get LoRA adapters, and at what rank: recipe parts resolved against a model's modules.

Pure module-name logic (no peft import), shared by training (lftk.train.lora) and the `--dry-run`
memory estimate, which resolves the same patterns on a meta-device model. The result is one
assignment per component, `{module name: ModuleLora}`, from which the peft config is written:
one adapter per component whose targets are the union of its parts, with per-module rank and
alpha through peft's `rank_pattern`/`alpha_pattern` (saved with the adapter, so stock loaders scale
every module right).
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch

from lftk.config import LoraConfig
from lftk.errors import LftkError

# Layers peft adapts and that these models train through (attention projections, resnet/VAE convs).
ADAPTABLE = (torch.nn.Linear, torch.nn.Conv2d)
COMPONENT_LABEL = {"unet": "UNet", "vae_encoder": "VAE encoder"}


@dataclass(frozen=True)
class ModuleLora:
    part: str
    rank: int
    alpha: float
    dropout: float


def matches(name: str, pattern: str) -> bool:
    """`pattern` names the module itself or a dotted suffix of its name; `*` is a wildcard."""
    return fnmatchcase(name, pattern) or fnmatchcase(name, "*." + pattern)


def in_scope(component: str, name: str) -> bool:
    """The UNet is adapted anywhere; the VAE only where it encodes (its decoder must keep matching the
    latents the UNet learned to produce, and export/inference decode through it)."""
    if component == "unet":
        return True
    return name.startswith("encoder.") or name == "quant_conv"


def adaptable_layers(component: str, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ADAPTABLE) and in_scope(component, n)}


def assign(cfg: LoraConfig, component: str, model: torch.nn.Module) -> dict[str, ModuleLora]:
    """Module name -> the settings of the part that claims it. Every pattern must match a layer, and a
    layer may belong to one part only (it has one rank); all problems are reported together."""
    layers = adaptable_layers(component, model)
    label = COMPONENT_LABEL[component]
    out: dict[str, ModuleLora] = {}
    problems: list[str] = []
    for name, part in cfg.resolved_parts().items():
        if part.component != component:
            continue
        key = cfg.part_key(name)
        for pattern in part.targets:
            hits = [n for n in layers if matches(n, pattern)]
            if not hits:
                problems.append(f"{key}: {pattern!r} matches no {label} Linear/Conv2d layer{_nearest(pattern, layers)}")
                continue
            clash = next((n for n in hits if n in out and out[n].part != name), None)
            if clash is not None:
                problems.append(f"{key}: {pattern!r} matches {clash}, already in part '{out[clash].part}' (a layer has one rank)")
                continue
            for n in hits:
                out[n] = ModuleLora(name, part.rank, part.alpha, part.dropout)
    if problems:
        raise LftkError("LoRA parts do not fit the model:\n  - " + "\n  - ".join(problems))
    return out


def _nearest(pattern: str, layers: dict) -> str:
    """A hint: the closest layer-name tails (as long as the pattern) to a pattern that matched nothing."""
    depth = pattern.count(".") + 1
    tails = sorted({".".join(n.split(".")[-depth:]) for n in layers})
    near = difflib.get_close_matches(pattern, tails, n=3, cutoff=0.5)
    return f" (nearest: {', '.join(near)})" if near else ""


def exact_key(name: str) -> str:
    """A peft pattern key that matches this module only: peft tries `(.*\\.)?(key)$` from the start, so a
    leading ^ rules out longer names that end with this one (peft's own advice for rank_pattern)."""
    return "^" + re.escape(name)


def peft_kwargs(assigned: dict[str, ModuleLora]) -> dict:
    """peft.LoraConfig arguments for one adapter over `assigned`: the most common rank/alpha/dropout are
    the adapter's defaults; modules that differ get exact rank_pattern/alpha_pattern entries."""
    if not assigned:
        raise LftkError("no modules to adapt")
    r = Counter(m.rank for m in assigned.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in assigned.values()).most_common(1)[0][0]
    dropout = Counter(m.dropout for m in assigned.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,  # peft has one dropout per adapter; lftk.train.lora sets the others per module
        "target_modules": sorted(assigned),
        "rank_pattern": {exact_key(n): m.rank for n, m in sorted(assigned.items()) if m.rank != r},
        "alpha_pattern": {exact_key(n): m.alpha for n, m in sorted(assigned.items()) if m.alpha != alpha},
        "init_lora_weights": "gaussian",
    }


def lora_param_count(model: torch.nn.Module, assigned: dict[str, ModuleLora]) -> int:
    """Adapter parameters: A (in -> r, the layer's kernel for a conv) and B (r -> out, 1x1 for a conv)."""
    modules = dict(model.named_modules())
    total = 0
    for name, m in assigned.items():
        layer = modules[name]
        if isinstance(layer, torch.nn.Conv2d):
            kh, kw = layer.kernel_size
            total += m.rank * (layer.in_channels * kh * kw + layer.out_channels)
        else:
            total += m.rank * (layer.in_features + layer.out_features)
    return total


def summary(assigned: dict[str, ModuleLora]) -> dict[str, dict]:
    """Per part: rank, alpha, dropout and how many layers it adapts (for logs and lftk_model.json)."""
    out: dict[str, dict] = {}
    for m in assigned.values():
        row = out.setdefault(m.part, {"rank": m.rank, "alpha": m.alpha, "dropout": m.dropout, "modules": 0})
        row["modules"] += 1
    return out
