"""The independent check of a trained model: `lftk infer --episode` on every test pair of a pair dir,
its prediction scored against the true future frame, beside copying the current frame.

    python bench/infer_vs_copy.py --model demo/export --data demo/data/pairs [--backend ort] [--split test]

Each pair names its source episode and frame (prompt.json), so `lftk infer --episode EP --start-frame F
--frames 1` predicts exactly that pair's future and writes its PSNR against the episode's true frame
into timing.json. This goes through the CLI users type (the export, the runner, the backend), not
through `lftk eval`'s code. Prints one table: PSNR of the model and of copy, mean [95% bootstrap
interval over episodes], and how many pairs the model wins.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="export dir (or run/pipeline dir with --backend torch)")
    ap.add_argument("--data", required=True, type=Path, help="pair dir from lftk data pairs")
    ap.add_argument("--backend", default="ort")
    ap.add_argument("--split", default="test")
    ap.add_argument("--max-samples", type=int, help="at most this many pairs, spread over the split (as lftk eval)")
    ap.add_argument("--json", type=Path, help="write the per-pair figures here")
    args = ap.parse_args(argv)

    from lftk.cli import app
    from lftk.data.images import load_rgb
    from lftk.data.inspect import spread_indices
    from lftk.data.pairset import PairSet
    from lftk.eval.stats import Bootstrap
    from lftk.eval.metrics import psnr_db

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pairs = PairSet(args.data, args.split)
        for pair in (pairs[i] for i in spread_indices(len(pairs), args.max_samples)):
            p = pair.prompt
            out = Path(tmp) / pair.name
            cmd = ["infer", "--model", str(args.model), "--backend", args.backend, "--episode", p["source_episode_dir"],
                   "--start-frame", str(p["frame"]), "--frames", "1", "--out", str(out)]
            if p.get("horizon") is not None:
                cmd += ["--horizon", str(p["horizon"])]
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # its one-line summary per pair
                    app(cmd, standalone_mode=False)
            except SystemExit as exc:  # typer exits 0 on success in some versions
                if exc.code:
                    raise
            timing = json.loads((out / "timing.json").read_text())
            r = timing["resolution"]
            truth = load_rgb(Path(p["source_episode_dir"]) / f"{p['future_frame']}.jpg", r) / 255.0
            current = load_rgb(Path(p["source_episode_dir"]) / f"{p['frame']}.jpg", r) / 255.0
            rows.append({"sample": pair.name, "episode": f"{pair.task}/{p.get('episode')}",
                         "model_psnr": timing["truth"]["psnr_db"][0], "copy_psnr": round(float(psnr_db(current, truth)), 3)})
    episodes = [r["episode"] for r in rows]
    boot = Bootstrap(episodes)
    diff = boot.mean_ci([r["model_psnr"] - r["copy_psnr"] for r in rows], episodes)
    print(f"{len(rows)} {args.split} pairs from {len(set(episodes))} episodes, lftk infer --backend {args.backend}, "
          f"steps, guidance and keep rules as the model records them")
    print("| | PSNR (dB) | 95% interval |\n| --- | --- | --- |")
    for name in ("model", "copy"):
        m = boot.mean_ci([r[f"{name}_psnr"] for r in rows], episodes)
        print(f"| {name} | {m['mean']:.2f} | {_ci(m['ci'])} |")
    print(f"| model - copy (paired) | {diff['mean']:+.2f} | {_ci(diff['ci'])} |")
    wins = sum(r["model_psnr"] > r["copy_psnr"] for r in rows)
    print(f"model ahead of copy on {wins} of {len(rows)} pairs")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def _ci(ci: list[float] | None) -> str:
    return "n/a" if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


if __name__ == "__main__":
    sys.exit(main())
