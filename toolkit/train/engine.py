"""The one training engine: DeepSpeed, configured from the recipe (no hand-written JSON needed).

On a CPU machine DeepSpeed's accelerator is CPU and its backend gloo; on GPUs it is CUDA/NCCL.
A single process still needs the torch.distributed environment variables, or DeepSpeed falls
back to MPI discovery (and fails without mpi4py), so `ensure_dist_env` sets them when no launcher did.
"""

from __future__ import annotations

import logging
import math
import os
import socket

import torch

from lftk.config import Recipe
from lftk.errors import NotAvailableError

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_dist_env() -> None:
    """Single-process defaults for torch.distributed; launchers (torchrun, deepspeed) set their own."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def init_distributed(timeout_s: float) -> None:
    """The process group, with `timeout_s` for every collective: a lost or hung rank ends the run with an
    error after that long instead of DeepSpeed's 30 minutes (deepspeed.initialize keeps a group it finds)."""
    import datetime

    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s), verbose=False)


def deepspeed_config(recipe: Recipe, world_size: int) -> dict:
    t = recipe.train
    cfg: dict = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * world_size,
        "zero_optimization": _zero_block(recipe),
        "steps_per_print": 10**9,  # lftk logs its own metrics
        "wall_clock_breakdown": False,
    }
    if t.max_grad_norm > 0:
        cfg["gradient_clipping"] = t.max_grad_norm
    if t.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    elif t.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    if t.optimizer == "adamw":
        # torch_adam: torch's AdamW instead of a JIT-compiled FusedAdam (a minute of g++ on CPU).
        cfg["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": t.lr, "weight_decay": t.weight_decay, "torch_adam": True, "betas": [0.9, 0.999]},
        }
    else:
        cfg["zero_allow_untested_optimizer"] = True
    return cfg


def _zero_block(recipe: Recipe) -> dict:
    t = recipe.train
    block: dict = {"stage": t.zero_stage}
    if t.offload_optimizer:
        block["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if t.offload_params:
        block["offload_param"] = {"device": "cpu", "pin_memory": True}
    return block


def _client_optimizer(recipe: Recipe, params):
    t = recipe.train
    if t.optimizer == "adamw":
        return None
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise NotAvailableError(f"train.optimizer={t.optimizer} needs bitsandbytes: pip install 'lftk[train]'") from exc
    cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[t.optimizer]
    return cls(params, lr=t.lr, weight_decay=t.weight_decay, min_8bit_size=t.min_8bit_size)


def lr_factor(recipe: Recipe, total_steps: int):
    """Linear warm-up, then constant or cosine to zero at `total_steps`."""
    warm, cosine = recipe.train.warmup_steps, recipe.train.lr_schedule == "cosine"

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if not cosine:
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def setup_engine(model: torch.nn.Module, recipe: Recipe, total_steps: int):
    """deepspeed.initialize over the trainable model; returns (engine, lr_scheduler)."""
    try:
        import deepspeed
    except ImportError as exc:
        raise NotAvailableError("training needs DeepSpeed: pip install 'lftk[train]'") from exc
    ensure_dist_env()
    world = int(os.environ["WORLD_SIZE"])
    init_distributed(recipe.train.dist_timeout_s)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _client_optimizer(recipe, params)
    cfg = deepspeed_config(recipe, world)
    # The LR schedule goes through DeepSpeed so that engine.step() advances it and checkpoints carry it.
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=params,
        optimizer=optimizer,
        config=cfg,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(recipe, total_steps)),
    )
    log.info(
        "DeepSpeed engine: ZeRO-%d, %s, %d rank(s), %s, %.2f M trainable params",
        recipe.train.zero_stage,
        recipe.train.precision,
        world,
        recipe.train.optimizer,
        sum(p.numel() for p in params) / 1e6,
    )
    return engine, scheduler
