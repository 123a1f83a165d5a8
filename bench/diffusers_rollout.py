"""The stock pipeline as lftk's benchmark peer: a rollout with diffusers' own InstructPix2Pix pipeline.

    python bench/diffusers_rollout.py --model BASE --resolution 128 --steps 100 --frames 15 --json OUT.json

Each frame is predicted from the one before (as `lftk infer` and `lftk bench` roll out), with the
pipeline's own scheduler and guidance 7.5 / 1.5, fp16 on a GPU (fp32 on a CPU, where it runs as a
rehearsal). The time is the best of `--repeats` whole rollouts after one warm-up frame; the same
sizes in `lftk bench` give the lftk rows to set beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--frames", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)

    from diffusers import StableDiffusionInstructPix2PixPipeline
    from PIL import Image

    cuda = torch.cuda.is_available()
    dtype = torch.float16 if cuda else torch.float32
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(args.model, torch_dtype=dtype, safety_checker=None)
    pipe = pipe.to("cuda" if cuda else "cpu")
    pipe.set_progress_bar_config(disable=True)
    start = Image.fromarray(np.random.default_rng(0).integers(0, 255, (args.resolution,) * 2 + (3,), dtype=np.uint8))

    def rollout(frames: int) -> float:
        image, t0 = start, time.perf_counter()
        for k in range(frames):
            image = pipe("stack the blocks", image=image, num_inference_steps=args.steps, guidance_scale=7.5,
                         image_guidance_scale=1.5, generator=torch.Generator().manual_seed(k)).images[0]
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    rollout(1)  # warm-up: kernels, allocator
    times = [rollout(args.frames) for _ in range(args.repeats)]
    out = {
        "backend": "diffusers StableDiffusionInstructPix2PixPipeline", "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name() if cuda else "cpu", "resolution": args.resolution, "steps": args.steps,
        "frames": args.frames, "seconds": [round(t, 4) for t in times], "best_s": round(min(times), 4),
        "ms_per_frame": round(1000 * min(times) / args.frames, 2), "scheduler": type(pipe.scheduler).__name__,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"diffusers pipeline ({out['dtype']}, {out['scheduler']}): {args.frames} frames x {args.steps} steps at "
          f"{args.resolution} px: {out['best_s']:.2f} s ({out['ms_per_frame']:.1f} ms/frame; runs {out['seconds']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
