"""Training steps on a recipe's real architecture: samples/s and peak GPU memory beside `--dry-run`.

    python bench/train_steps.py recipes/stage2.yaml --base BASE --steps 20 --json OUT.json [key=value ...]

Runs the recipe through lftk's own engine (DeepSpeed, the recipe's optimizer, precision, LoRA or
full, checkpointing) for `--steps` optimizer steps on synthetic pairs at the recipe's resolution
(random frames: step time and memory do not depend on the pixels), then reports steady-state
samples/s (steps after the first `--warmup` ones), `torch.cuda.max_memory_allocated`, and the
`lftk train --dry-run` estimate of the same recipe with the ratio between them.

Where DeepSpeed (or, for an 8-bit optimizer, bitsandbytes) does not import, it says which and measures
the closest thing it can: the same UNet, batch, precision and checkpointing in a plain torch loop with
torch's AdamW (32-bit state: the memory figure is then an upper bound for an 8-bit recipe). On a CPU it
runs too (tiny bases, fp32), as a rehearsal; memory is then n/a.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def synthetic_pairs(root: Path, n: int, resolution: int, seed: int = 0) -> Path:
    """A pair dir of `n` train and 2 val pairs of smooth random frames, in lftk's sample format."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", 2)):
        for i in range(count):
            d = root / split / f"synthetic__episode{i}__f0000"
            d.mkdir(parents=True, exist_ok=True)
            base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            for k in (0, 1):
                Image.fromarray(np.roll(base, k, axis=1)).resize((resolution, resolution), Image.BILINEAR).save(d / f"000000_{k}.jpg")
            (d / "prompt.json").write_text(json.dumps({"instruction": "stack the blocks", "horizon": 100, "task": "synthetic"}))
    (root / "pairs.json").write_text(json.dumps({"horizon": 100}))
    return root


def missing_engine(recipe) -> list[str]:
    """The packages lftk's engine needs for this recipe that do not import here."""
    need = ["deepspeed"] + (["bitsandbytes"] if "8bit" in recipe.train.optimizer else [])
    out = []
    for name in need:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an import that fails for any reason means "not here"
            out.append(name)
    return out


def _steady(rows: list[dict], warmup: int, per_step: int) -> float | None:
    """Samples/s from metrics.jsonl rows (step, elapsed_s), leaving out the first `warmup` steps."""
    rows = [r for r in rows if "loss" in r and "elapsed_s" in r]
    later = [r for r in rows if r["step"] > warmup]
    if len(later) < 2:
        return None
    a, b = later[0], later[-1]
    return (b["step"] - a["step"]) * per_step / max(b["elapsed_s"] - a["elapsed_s"], 1e-9)


def run_engine(recipe) -> tuple[list[dict], str]:
    from lftk.train.loop import train

    run = train(recipe)
    rows = [json.loads(line) for line in run.metrics.read_text().splitlines() if line.strip()]
    return rows, "lftk engine (DeepSpeed)"


def run_plain(recipe, steps: int, device: str) -> tuple[list[dict], str]:
    """The recipe's UNet, batch, precision and checkpointing, in a plain torch loop (AdamW, 32-bit)."""
    from lftk.model.base import load_pipeline

    t = recipe.train
    pipe = load_pipeline(recipe.model.base)
    unet = pipe.unet.to(device).train()
    if t.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if t.trainable == "lora":
        from lftk.train.lora import add_lora

        add_lora(unet, t.lora)  # freezes the UNet, adds trainable adapters
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr)
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(t.precision)
    scaler = torch.amp.GradScaler("cuda", enabled=half is torch.float16 and device == "cuda")
    side = t.resolution // 8
    dim = unet.config.cross_attention_dim
    rows, t0 = [], time.perf_counter()
    for step in range(1, steps + 1):
        for _ in range(t.grad_accum):
            x = torch.randn(t.batch_size, 8, side, side, device=device)
            ts = torch.randint(0, 1000, (t.batch_size,), device=device)
            text = torch.randn(t.batch_size, 77, dim, device=device)
            with torch.autocast(device_type=device, dtype=half, enabled=half is not None and device == "cuda"):
                loss = (unet(x, ts, text).sample.float() - x[:, :4]).pow(2).mean()
            scaler.scale(loss / t.grad_accum).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        rows.append({"step": step, "loss": loss.item(), "elapsed_s": time.perf_counter() - t0})
    return rows, "plain torch loop, torch AdamW (32-bit state)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    ap.add_argument("--base", required=True, help="model dir (e.g. from `lftk init-base DIR --preset sd15`)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=None, help="first steps left out of samples/s (default: 5, at most half)")
    ap.add_argument("--work", default="/tmp/lftk-train-steps")
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)

    from lftk.config import load_recipe
    from lftk.train.memory import estimate

    work = Path(args.work) / Path(args.recipe).stem
    if work.exists():
        import shutil

        shutil.rmtree(work)
    fixed = [f"model.base={args.base}", f"output_dir={work / 'run'}", f"max_steps={args.steps}",
             "train.val_every=null", "train.val_samples=0", "train.checkpoint_every=null", "train.log_every=1",
             "sampling.guidance=7.5", "sampling.image_guidance=1.5"]
    probe = load_recipe(args.recipe, [f"data.path={work / 'pairs'}", *fixed, *args.overrides])
    per_step = probe.train.batch_size * probe.train.grad_accum
    synthetic_pairs(work / "pairs", max(per_step * 4, 8), probe.train.resolution)
    recipe = probe
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warmup = args.warmup if args.warmup is not None else min(5, args.steps // 2)
    missing = missing_engine(recipe)
    rows, engine = run_plain(recipe, args.steps, device) if missing else run_engine(recipe)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    est = estimate(recipe, world=1)
    out = {
        "recipe": args.recipe, "overrides": args.overrides, "engine": engine, "missing": missing, "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "resolution": recipe.train.resolution, "trainable": recipe.train.trainable, "optimizer": recipe.train.optimizer,
        "precision": recipe.train.precision, "batch_size": recipe.train.batch_size, "grad_accum": recipe.train.grad_accum,
        "steps": args.steps, "samples_per_s": _steady(rows, warmup, per_step),
        "peak_gib": round(peak, 3) if peak is not None else None, "dry_run_gib": round(est.total_gib, 3),
        "dry_run_vs_peak": round(est.total_gib / peak, 3) if peak else None,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    note = f" (missing: {', '.join(missing)}; measured the closest plain-torch loop)" if missing else ""
    sps = f"{out['samples_per_s']:.1f}" if out["samples_per_s"] else "n/a"
    mem = f"{out['peak_gib']:.2f} GiB" if out["peak_gib"] is not None else "n/a"
    print(f"{args.recipe}: {engine}{note}: {sps} samples/s, peak {mem}, dry-run {out['dry_run_gib']:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
