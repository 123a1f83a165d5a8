"""UNet time per frame against the number of frames per call, for one export's ONNX UNet (onnxruntime).

    python bench/unet_batch.py EXPORT_DIR [--frames 1,2,4,8,16] [--threads 1] [--repeats 5]

Each call carries the 3 guidance branches of every frame (batch 3 x frames), as the runner's batched
predict does. Calls of every size are interleaved and the best of `repeats` is kept, so a busy
machine affects all sizes alike. Shows whether batching frames pays on this machine: on a GPU the
per-frame time falls with the batch; on a small CPU it can rise (caches).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export", type=Path)
    ap.add_argument("--frames", default="1,2,4,8,16")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (0: its default)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import torch

    from lftk.runtime.manifest import component_files, verify_manifest
    from lftk.runtime.ort_graph import OrtGraph

    manifest = verify_manifest(args.export)
    comp = manifest["components"]["unet"]
    dtypes = {t["name"]: t["dtype"] for t in comp["inputs"]}
    graph = OrtGraph(args.export / component_files(manifest, "unet", "fp32")[0]["path"], dtypes,
                     comp["outputs"][0]["name"], threads=args.threads, io_binding=True)
    shapes = {t["name"]: t["shape"] for t in comp["inputs"]}
    gen = torch.Generator().manual_seed(0)

    def inputs(batch: int) -> list[torch.Tensor]:
        out = []
        for name, shape in shapes.items():
            concrete = [batch if d == "B" else d for d in shape]
            out.append(torch.full(concrete, 500.0) if name == "timestep" else torch.randn(concrete, generator=gen))
        return out

    sizes = [int(f) for f in args.frames.split(",")]
    feeds = {n: inputs(3 * n) for n in sizes}
    best = dict.fromkeys(sizes, float("inf"))
    for n in sizes:  # warm-up: onnxruntime plans each shape on first sight
        graph(*feeds[n])
    for _ in range(args.repeats):
        for n in sizes:
            t0 = time.perf_counter()
            graph(*feeds[n])
            best[n] = min(best[n], time.perf_counter() - t0)
    print(f"onnxruntime UNet, {args.threads or 'default'} thread(s), best of {args.repeats}, {args.export}")
    print(f"{'frames per call':>16} " + " ".join(f"{n:>8}" for n in sizes))
    print(f"{'ms per call':>16} " + " ".join(f"{1000 * best[n]:8.2f}" for n in sizes))
    print(f"{'ms per frame':>16} " + " ".join(f"{1000 * best[n] / n:8.2f}" for n in sizes))
    print(f"batched speed-up at {sizes[-1]} frames per call: {best[sizes[0]] * sizes[-1] / sizes[0] / best[sizes[-1]]:.2f}x")


if __name__ == "__main__":
    main()
