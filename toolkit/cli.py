"""The `lftk` command. Thin: parse, call the library, report. Bad input exits 2 with one line."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from lftk.errors import LftkError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="lftk: predict what a robot will see next. Train (InstructPix2Pix), export (ONNX/TensorRT), run fast.",
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(no_args_is_help=True, help="Make, import, pair and inspect datasets.")
app.add_typer(data_app, name="data")
log = logging.getLogger("lftk")


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False)
        fmt = "%(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("lftk").setLevel(level)
    quiet_libraries(verbose)


def quiet_libraries(verbose: bool = False) -> None:
    """Library chatter (per-component load bars, optional-backend notices) buries lftk's own lines."""
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("transformers", "diffusers", "bitsandbytes", "DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    _setup_logging(verbose)


def _done(msg: str) -> None:
    typer.echo(msg)


# ---------------------------------------------------------------------------------------------- data


@data_app.command("sim")
def data_sim(
    out: Path = typer.Argument(..., help="Output episodes dir."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated tasks (default: all three)."),
    episodes: int = typer.Option(2, min=1, help="Episodes per task."),
    frames: int = typer.Option(300, min=2, help="Frames per episode (10 per simulated second)."),
    resolution: int = typer.Option(128, min=16, help="Frame side in pixels."),
    seed: int = typer.Option(0, help="Same seed, same bytes."),
    workers: int = typer.Option(2, min=1, help="Worker processes."),
) -> None:
    """Simulate episodes of the paper's tasks (pybullet, CPU renderer, two Panda arms, head camera).

    Example: lftk data sim data/episodes --tasks block_hammer_beat,stack --episodes 4 --frames 300
    """
    from lftk.sim.generate import simulate

    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    summary = simulate(out, task_list, episodes, frames, resolution, seed, workers)
    _done(f"simulated {summary['episodes']} episodes, {summary['frames']} frames in {summary['seconds']:.0f} s -> {out}")


@data_app.command("import")
def data_import(
    src: Path = typer.Argument(..., help="Source file or dir."),
    out: Path = typer.Argument(..., help="Output episodes dir."),
    format: str = typer.Option(..., "--format", help="robotwin-hdf5 | robotwin-pkl | frames | video | ip2p"),
    instruction: Optional[str] = typer.Option(None, help="Instruction for every episode."),
) -> None:
    """Import real data into the episode layout.

    Example: lftk data import ~/robotwin/block_hammer_beat data/episodes --format robotwin-hdf5
    """
    raise LftkError(
        "lftk data import is not available yet in this version: simulate with `lftk data sim`, "
        "or lay frames out as EPISODES/<task>/episode<k>/<i>.jpg with an episode.json"
    )


@data_app.command("pairs")
def data_pairs(
    episodes: Path = typer.Argument(..., help="Episodes dir (from `lftk data sim` or `lftk data import`)."),
    out: Path = typer.Argument(..., help="Output pair dir (InstructPix2Pix sample dirs per split)."),
    horizon: int = typer.Option(100, min=1, help="Frames ahead: 100 = 10 s at 10 fps."),
    stride: int = typer.Option(10, min=1, help="Frames between consecutive pairs of an episode."),
    split: str = typer.Option("0.8,0.1,0.1", help="train,val,test fractions, by episode."),
    seed: int = typer.Option(0, help="Seeds the episode split."),
) -> None:
    """Make (frame i, frame i+horizon) pairs, split by episode.

    Example: lftk data pairs data/episodes data/pairs --horizon 100 --stride 10
    """
    from lftk.data.pairs import make_pairs

    summary = make_pairs(episodes, out, horizon=horizon, stride=stride, split=split, seed=seed)
    counts = ", ".join(f"{k} {v['pairs']} pairs/{v['episodes']} episodes" for k, v in summary["counts"].items())
    _done(f"pairs written to {out} ({counts})")


@data_app.command("inspect")
def data_inspect(path: Path = typer.Argument(..., help="An episodes dir or a pair dir.")) -> None:
    """Counts per task and split, resolution, horizons, and a contact sheet PNG.

    Example: lftk data inspect data/pairs
    """
    import json

    from lftk.data.inspect import inspect_dir

    typer.echo(json.dumps(inspect_dir(path), indent=2, default=str))


# ---------------------------------------------------------------------------------------------- model


@app.command("init-base")
def init_base_cmd(
    out: Path = typer.Argument(..., help="Output pipeline dir."),
    preset: str = typer.Option("tiny", help="tiny (CPU, VAE fitted on --frames) | sd15 (full size, random weights)."),
    frames: Optional[Path] = typer.Option(None, help="Episodes dir whose frames fit the tiny VAE."),
    vae_steps: int = typer.Option(600, min=0, help="VAE fitting steps (tiny)."),
    seed: int = typer.Option(0),
) -> None:
    """Build a base InstructPix2Pix pipeline from configs.

    Example: lftk init-base models/tiny-base --preset tiny --frames data/episodes
    """
    from lftk.model.base import init_base

    frame_paths: list[Path] = []
    if frames is not None:
        if not frames.is_dir():
            raise LftkError(f"--frames {frames}: not a directory")
        frame_paths = sorted(p for p in frames.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not frame_paths:
            raise LftkError(f"--frames {frames}: no .jpg/.png frames found")
    init_base(out, preset=preset, frames=frame_paths, vae_steps=vae_steps, seed=seed)
    _done(f"base pipeline ({preset}) -> {out}")


@app.command("train", context_settings={"allow_extra_args": False})
def train_cmd(
    recipe: Path = typer.Argument(..., help="Recipe YAML (see recipes/)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, dotted paths: train.lr=3e-4"),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest complete checkpoint."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Local processes (GPUs); >1 launches torchrun."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved recipe and exit."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Estimate per-rank GPU memory and exit (no data, no weights)."),
    gpu_mem: Optional[float] = typer.Option(None, "--gpu-mem", help="With --dry-run: card memory in GiB to check against."),
) -> None:
    """Fine-tune InstructPix2Pix with DeepSpeed.

    Example: lftk train recipes/demo.yaml max_steps=50 train.lr=3e-4
    """
    from lftk.config import dump_recipe, load_recipe

    cfg = load_recipe(recipe, overrides or [])
    if print_config:
        typer.echo(dump_recipe(cfg))
        return
    if dry_run:
        from lftk.train.memory import estimate, format_estimate

        typer.echo(format_estimate(estimate(cfg, world=nproc), gpu_mem))
        return
    if nproc > 1 and "RANK" not in os.environ:
        from lftk.train.launch import launch_local

        raise typer.Exit(launch_local(nproc, [str(recipe), *(overrides or [])] + (["--resume"] if resume else [])))
    from lftk.train.loop import train

    run = train(cfg, resume=resume)
    if int(os.environ.get("RANK", 0)) == 0:
        _done(f"run: {run.root}\nfinal model: {run.final}\nnext: lftk eval {run.root} --data {cfg.data.path}")


# ---------------------------------------------------------------------------------------------- eval


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="Run dir, pipeline dir or export dir."),
    data: Path = typer.Option(..., "--data", help="Pair dir (its test split is used)."),
    baselines: str = typer.Option("copy", help="Comma-separated: copy"),
    out: Optional[Path] = typer.Option(None, help="Report dir (default: MODEL/eval or ./eval)."),
    steps: int = typer.Option(20, min=1, help="Denoising steps."),
    split: str = typer.Option("test", help="Split to evaluate."),
    max_samples: Optional[int] = typer.Option(None, min=1, help="Evaluate at most this many pairs."),
    seed: int = typer.Option(0),
) -> None:
    """SSIM and PSNR of the model beside baselines, with a report and a picture grid.

    Example: lftk eval runs/demo --data data/pairs --baselines copy
    """
    from lftk.eval.evaluate import evaluate

    out = out or (Path(model) / "eval" if Path(model).is_dir() else Path("eval"))
    names = tuple(b.strip() for b in baselines.split(",") if b.strip())
    report = evaluate(model, data, out, split=split, steps=steps, seed=seed, max_samples=max_samples, baselines=names)
    for method, m in report["means"].items():
        typer.echo(f"{method:>12}: SSIM {m['ssim']:.4f}  PSNR {m['psnr']:.2f} dB  (n={report['n_samples']})")
    _done(f"report: {out / 'report.json'}  grid: {out / 'grid.png'}")


# ---------------------------------------------------------------------------------------------- export / deploy


@app.command("export")
def export_cmd(
    model: str = typer.Argument(..., help="Run dir or pipeline dir."),
    onnx: bool = typer.Option(True, "--onnx/--no-onnx", help="Export ONNX graphs (default)."),
    trt: bool = typer.Option(False, "--trt", help="Build TensorRT engines (needs a GPU and TensorRT)."),
    precision: str = typer.Option("fp32", help="fp32 | fp16 | int8"),
    out: Optional[Path] = typer.Option(None, help="Export dir (default: MODEL/export)."),
) -> None:
    """Export the four networks to ONNX, check them and their parity with torch.

    Example: lftk export runs/demo --onnx --out exports/demo
    """
    from lftk.model.resolve import resolve_model

    if trt:
        raise LftkError("--trt: TensorRT engines are not available in this version; export ONNX and use --backend ort")
    if precision != "fp32":
        raise LftkError(f"--precision {precision}: only fp32 ONNX export is available in this version")
    ref = resolve_model(model)
    if ref.pipeline_dir is None:
        raise LftkError(f"{model}: nothing to export (no pipeline inside)")
    from lftk.export.onnx_export import export_onnx

    out = out or (ref.path / "export")
    export_onnx(ref.pipeline_dir, out)
    _done(f"export: {out}\nnext: lftk infer --model {out} --image FRAME.jpg --instruction \"stack blocks\" --backend ort")


@app.command("infer")
def infer_cmd(
    model: str = typer.Option(..., "--model", help="Export dir (ort/torch) or run/pipeline dir (torch)."),
    image: Path = typer.Option(..., "--image", help="Current camera frame."),
    instruction: str = typer.Option(..., "--instruction", help='e.g. "beat the block with the hammer"'),
    backend: str = typer.Option("ort", help="torch | ort | trt"),
    frames: int = typer.Option(15, min=1, help="Future frames to predict."),
    mode: str = typer.Option("rollout", help="rollout (t+Δ, t+2Δ, ...) | sweep"),
    steps: int = typer.Option(20, min=1, help="Denoising steps per frame."),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("infer_out"), help="Output dir for frames, GIF and timing.json."),
) -> None:
    """Predict future frames with a rollout.

    Example: lftk infer --model exports/demo --image frame.jpg --instruction "stack blocks" --frames 15
    """
    from lftk.deploy.infer import run_infer

    summary = run_infer(model, image, instruction, backend=backend, frames=frames, mode=mode, steps=steps, seed=seed, out=out)
    _done(f"{frames} frame(s) in {summary['total_seconds']:.2f} s -> {out} (gif: {out / 'rollout.gif'})")


@app.command("bench")
def bench_cmd(
    model: str = typer.Option(..., "--model", help="Export dir."),
    backends: str = typer.Option("torch,ort,trt", help="Comma-separated backends."),
) -> None:
    """Time backends side by side: ms per UNet step, ms per frame, frames/s, parity.

    Example: lftk bench --model exports/demo --backends torch,ort
    """
    raise LftkError("lftk bench is not available yet in this version; `lftk infer` writes timing.json per run")


@app.command("doctor")
def doctor_cmd() -> None:
    """What this machine has (Python, torch, CUDA, onnxruntime, DeepSpeed, ...) and what it can run.

    Example: lftk doctor
    """
    from lftk.doctor import report

    typer.echo(report())


def main() -> None:
    try:
        app()
    except LftkError as exc:
        first, *rest = str(exc).splitlines() or [""]
        typer.echo(f"error: {first}", err=True)
        for line in rest:
            typer.echo(line, err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
