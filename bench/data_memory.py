"""Does training's data path use memory that grows with the dataset? (issue #4's acceptance check)

Builds pair dirs of 1k and 100k pairs by hard-linking a few small JPEGs and prompt.json files (no
image is encoded 100k times), then, in a fresh process per size, builds the loader exactly as
`lftk.train.loop` does (PairSet -> PairDataset -> make_loader, 2 worker processes) and reads batches,
printing the memory of the main process and its workers at a few points.

Why both RSS and PSS: the workers are forked, so the pages they share with the main process count
once per process in RSS; PSS splits shared pages among their sharers (the honest total), and USS is
what a process holds alone (what copy-on-write has duplicated).

    python bench/data_memory.py                 # 1k and 100k, about a minute on 2 cores
    python bench/data_memory.py --sizes 1000,20000 --batches 300

The pair dirs are kept in --work (default: a dir under the system temp dir) and reused by the next
run: deleting 100k dirs takes minutes on some filesystems (ext4 mounted with `discard`: ~5 min here),
longer than the benchmark. --clean deletes them at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SOURCES = 4  # distinct frames / prompts that every sample links to
RESOLUTION = 64


def pair_dir(work: Path, n: int) -> tuple[Path, float]:
    """A pair dir of n pairs under `work`, reused when a finished one is there; (path, seconds spent building)."""
    root = work / f"pairs{n}"
    if (root / "_sources" / "done").is_file():
        return root, 0.0
    if root.exists():  # an interrupted build: start over
        import shutil

        shutil.rmtree(root)
    t0 = time.perf_counter()
    build_pair_dir(root, n)
    (root / "_sources" / "done").write_text(str(n))
    return root, time.perf_counter() - t0


def build_pair_dir(root: Path, n: int) -> Path:
    """root/train/<sample>/{000000_0.jpg, 000000_1.jpg, prompt.json}, every file a hard link to one of SOURCES."""
    import numpy as np
    from PIL import Image

    from lftk.data.pairs import CURRENT_NAME, FUTURE_NAME, PROMPT_NAME

    src = root / "_sources"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(SOURCES):
        for side in (0, 1):
            arr = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(arr).resize((RESOLUTION, RESOLUTION), Image.BILINEAR).save(src / f"{k}_{side}.jpg", quality=95)
        prompt = {"instruction": f"stack the blocks {k}", "horizon": 100, "task": f"task{k}", "episode": f"episode{k}", "frame": 0}
        (src / f"{k}.json").write_text(json.dumps(prompt, indent=2))
    split = root / "train"
    split.mkdir()
    for i in range(n):
        k = i % SOURCES
        d = split / f"task{k}__episode{i // SOURCES}__f0000"
        d.mkdir()
        os.link(src / f"{k}_0.jpg", d / CURRENT_NAME)
        os.link(src / f"{k}_1.jpg", d / FUTURE_NAME)
        os.link(src / f"{k}.json", d / PROMPT_NAME)
    return root


def memory(pid: int) -> dict:
    """MiB for a process and its children: RSS (shared pages counted per process), PSS, USS."""
    import psutil

    main = psutil.Process(pid)
    procs = [main, *main.children(recursive=True)]
    out = {"rss": 0.0, "pss": 0.0, "uss": 0.0, "main_rss": main.memory_info().rss / 2**20, "worker_uss": 0.0,
           "workers": len(procs) - 1}
    for p in procs:
        try:
            full = p.memory_full_info()
        except psutil.Error:
            continue
        out["rss"] += full.rss / 2**20
        out["pss"] += getattr(full, "pss", full.rss) / 2**20
        out["uss"] += full.uss / 2**20
        if p is not main:  # what copy-on-write has duplicated into the workers so far
            out["worker_uss"] += full.uss / 2**20
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in out.items()}


def measure(root: Path, batches: int, batch_size: int, workers: int, tok_dir: Path) -> dict:
    """One size, in this (fresh) process: the loader as the training loop builds it, then `batches` batches."""
    import torch

    from lftk.data.pairset import PairSet
    from lftk.model.tokenizer import build_clip_tokenizer
    from lftk.train.data import PairDataset, make_loader

    torch.set_num_threads(1)
    pid = os.getpid()
    tokenizer = build_clip_tokenizer(tok_dir)
    points = {"start": memory(pid)}
    t0 = time.perf_counter()
    pairs = PairSet(root, "train")
    points["pairset"] = memory(pid)
    listing_s = time.perf_counter() - t0
    dataset = PairDataset(pairs, RESOLUTION, tokenizer, "Scene after executing '{instruction}'")
    loader = make_loader(dataset, batch_size, 1, rank=0, world=1, seed=0, start_micro=0, workers=workers)
    it = iter(loader)
    t0 = time.perf_counter()
    checkpoints = sorted({batches // 4, batches // 2, batches})
    for b in range(1, batches + 1):
        batch = next(it)
        assert batch["current"].shape == (batch_size, 3, RESOLUTION, RESOLUTION)
        if b in checkpoints:
            points[f"batch{b}"] = memory(pid)
    read_s = time.perf_counter() - t0
    del it, loader
    return {"n": len(pairs), "listing_s": round(listing_s, 2), "read_s": round(read_s, 2), "points": points}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,100000")
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lftk-bench-data-memory")
    ap.add_argument("--clean", action="store_true", help="delete the pair dirs at the end (slow on some filesystems)")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # internal: one size in a fresh process
    ap.add_argument("--tok", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.batches, args.batch_size, args.workers, args.tok)))
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    args.work.mkdir(parents=True, exist_ok=True)
    for n in sizes:
        root, build_s = pair_dir(args.work, n)
        cmd = [sys.executable, __file__, "--measure", str(root), "--tok", str(args.work / "tok"),
               "--batches", str(args.batches), "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        res = json.loads(out.strip().splitlines()[-1])
        results.append(res)
        built = f"built in {build_s:.1f} s" if build_s else "reused"
        print(f"\n{n} pairs (dir {built}, PairSet listed in {res['listing_s']} s, "
              f"{args.batches} batches of {args.batch_size} read in {res['read_s']} s, {args.workers} workers)")
        print(f"  {'point':<10} {'RSS MiB':>9} {'PSS MiB':>9} {'main RSS':>9} {'worker USS':>11} {'workers':>8}")
        for name, m in res["points"].items():
            print(f"  {name:<10} {m['rss']:>9} {m['pss']:>9} {m['main_rss']:>9} {m['worker_uss']:>11} {m['workers']:>8}")
    if len(results) >= 2:
        a, b = results[0], results[-1]
        dn = b["n"] - a["n"]
        last = f"batch{args.batches}"
        for key in ("rss", "pss"):
            grow = b["points"][last][key] - a["points"][last][key]
            print(f"\n{key.upper()} after {args.batches} batches: {a['points'][last][key]} MiB at {a['n']} pairs, "
                  f"{b['points'][last][key]} MiB at {b['n']} pairs: {grow:+.1f} MiB, {grow * 2**20 / dn:.0f} B per extra pair")
        listing = (b["points"]["pairset"]["main_rss"] - b["points"]["start"]["main_rss"]) - (
            a["points"]["pairset"]["main_rss"] - a["points"]["start"]["main_rss"])
        print(f"PairSet listing (main process): {listing:+.1f} MiB for {dn} extra pairs, {listing * 2**20 / dn:.0f} B per pair")

    if args.clean:
        import shutil

        shutil.rmtree(args.work)
    else:
        print(f"\npair dirs kept for the next run in {args.work} (--clean, or rm -rf it, to free them)")


if __name__ == "__main__":
    main()
