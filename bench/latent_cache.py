"""Training step time with and without the VAE latent cache (tiny model, CPU), in one run.

    python bench/latent_cache.py [--steps 40] [--batch 8] [--resolution 64]

Builds a tiny base pipeline and a synthetic pair dir, trains the same recipe twice (cache off, cache
on) and prints ms per optimizer step for each and their ratio. The cache build itself is a one-off
cost, printed separately.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def _step_ms(run: Path, warmup: int) -> float:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    a, b = rows[warmup - 1], rows[-1]
    return 1000 * (b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=64)
    args = ap.parse_args()

    from conftest import write_pair_dir

    from lftk.config import load_recipe
    from lftk.model.base import assemble_pipeline
    from lftk.model.components import build_components
    from lftk.model.tokenizer import build_clip_tokenizer
    from lftk.train.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        parts = build_components("tiny")
        pipe = assemble_pipeline(parts["unet"], parts["vae"], parts["text_encoder"], build_clip_tokenizer(tmp / "tok"))
        pipe.save_pretrained(str(tmp / "base"))
        pairs = write_pair_dir(tmp / "pairs", {"train": 64, "val": 4}, size=128)
        common = [f"data.path={pairs}", f"model.base={tmp / 'base'}", f"max_steps={args.steps}",
                  f"train.batch_size={args.batch}", f"train.resolution={args.resolution}", "train.log_every=1"]
        results = {}
        for label, flag in (("no cache", "false"), ("latent cache", "true")):
            run = tmp / label.replace(" ", "_")
            t0 = time.perf_counter()
            train(load_recipe(REPO / "recipes" / "demo.yaml", [*common, f"output_dir={run}", f"train.cache_latents={flag}"]))
            results[label] = (_step_ms(run, warmup=5), time.perf_counter() - t0)
    print(f"tiny model, batch {args.batch}, {args.resolution} px, {args.steps} steps, CPU")
    for label, (ms, wall) in results.items():
        print(f"  {label:<13} {ms:8.1f} ms/step   (whole run incl. setup {wall:.1f} s)")
    ratio = results["no cache"][0] / results["latent cache"][0]
    print(f"  speed-up      {ratio:8.2f}x")


if __name__ == "__main__":
    main()
