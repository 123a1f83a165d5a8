"""The `lftk` command. Thin: parse, call the library, report. Bad input exits 2 with one line."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from lftk.errors import LftkError
from lftk.runtime.params import SamplingParams as _SP  # defaults named in --help

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

    Example: lftk data sim data/episodes --tasks block_hammer_beat,blocks_stack_easy --episodes 4 --frames 300
    """
    from lftk.sim.generate import simulate

    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    summary = simulate(out, task_list, episodes, frames, resolution, seed, workers)
    _done(f"simulated {summary['episodes']} episodes, {summary['frames']} frames in {summary['seconds']:.0f} s -> {out}")


from lftk.data.importers import format_help as _import_formats  # noqa: E402  (the FORMATS table: light, no h5py/av)


@data_app.command("import")
def data_import(
    src: Path = typer.Argument(..., help="Source: one file, or a dir searched recursively."),
    out: Path = typer.Argument(..., help="Output: an episodes dir, or a pair dir for --format ip2p. Must not exist yet."),
    format: str = typer.Option(..., "--format", help=_import_formats()),
    instruction: Optional[str] = typer.Option(None, help="Instruction for everything imported (default: the source's, else the task name)."),
    camera: Optional[str] = typer.Option(
        None, help="RoboTwin camera (head_camera (default) | left_camera | right_camera | front_camera); LeRobot camera "
        "key, e.g. observation.images.top (default: the dataset's first).",
    ),
    episodes: Optional[str] = typer.Option(None, help="LeRobot: which episode indices, e.g. 0-9,15 (default: all)."),
    fps: Optional[float] = typer.Option(None, min=0.001, help="The source's frame rate (default: a video's own; other sources are taken as 10). Frames are resampled to 10 fps."),
    resolution: int = typer.Option(128, min=0, help="Frame side: centre-crop to a square, then resize. 0 keeps the source size."),
    horizon: int = typer.Option(100, min=0, help="Skip episodes with no two frames this far apart (as `lftk data pairs --horizon`)."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Let robotwin-pkl load pickles: loading one runs code."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first bad file instead of skipping it."),
    task: Optional[str] = typer.Option(None, help="Task name for everything imported (default: from the source's dirs)."),
    follow_links: bool = typer.Option(
        False, "--follow-links", help="Also read files that links or table paths place outside SRC (skipped by default)."
    ),
) -> None:
    """Import real data. RoboTwin HDF5 and pickles, LeRobot datasets, frame folders and videos become an episodes dir
    (OUT/<task>/episode<k>/<i>.jpg + episode.json, for `lftk data pairs`); InstructPix2Pix sample
    dirs and tables (ip2p) are pairs already and become a pair dir (OUT/<split>/<sample>/, to train on).
    Bad files are skipped with a warning naming them (--strict: the first one stops the import);
    OUT appears only once complete.

    Example: lftk data import ~/robotwin/block_hammer_beat data/episodes --format robotwin-hdf5

    Example: lftk data import ~/datasets/aloha_static_coffee data/episodes --format lerobot --camera observation.images.cam_high
    """
    from lftk.data.importers import import_data

    summary = import_data(
        src, out, format, instruction=instruction, camera=camera, fps=fps, resolution=resolution,
        horizon=horizon, trust_pickle=trust_pickle, strict=strict, task=task, follow_links=follow_links,
        episodes=episodes,
    )
    skipped = f"{len(summary['skipped'])} skipped" + (" (see the warnings)" if summary["skipped"] else "")
    if summary["kind"] == "pairs":
        counts = ", ".join(f"{k} {v['pairs']}" for k, v in summary["counts"].items())
        _done(f"pair dir written to {out}: {summary['n_pairs']} pairs ({counts}); {skipped}\nnext: lftk train recipes/demo.yaml data.path={out}")
    else:
        _done(
            f"episodes dir written to {out}: {summary['episodes']} episodes, {summary['frames']} frames; {skipped}\n"
            f"next: lftk data pairs {out} PAIRS_DIR --horizon {horizon}"
        )


@data_app.command("pairs")
def data_pairs(
    episodes: Path = typer.Argument(..., help="Episodes dir (from `lftk data sim` or `lftk data import`)."),
    out: Path = typer.Argument(..., help="Output pair dir (InstructPix2Pix sample dirs per split)."),
    horizon: str = typer.Option(
        "100",
        help="Frames ahead: 100 = 10 s at 10 fps. A comma list (25,50,100) draws one per pair among those that "
        "fit its episode; then put {horizon} in data.prompt_template.",
    ),
    stride: int = typer.Option(10, min=1, help="Frames between consecutive pairs of an episode."),
    split: str = typer.Option("0.8,0.1,0.1", help="train,val,test fractions, by episode."),
    seed: int = typer.Option(0, help="Seeds the episode split and the per-pair horizon draw."),
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
    frames: Optional[Path] = typer.Option(
        None, help="Frames the tiny VAE is fitted on: a pair dir (fit on train, figures on val), an episodes dir "
        "(every 10th episode held out for the figures) or a dir of frames."
    ),
    vae_steps: Optional[int] = typer.Option(None, min=0, help="VAE fitting steps (default: the preset's); 0 keeps a random VAE, no --frames needed."),
    seed: int = typer.Option(0),
) -> None:
    """Build a base InstructPix2Pix pipeline from configs.

    Example: lftk init-base models/tiny-base --preset tiny --frames data/pairs
    """
    from lftk.model.base import init_base

    _, meta = init_base(out, preset=preset, frames=frames, vae_steps=vae_steps, seed=seed)
    fit = meta.get("vae_fit")
    if fit:
        missing = "n/a (no simulator states)" if fit["objects_missing"] is None else f"{fit['objects_missing']:.2f}"
        typer.echo(
            f"vae fit: {fit['steps']} steps on {fit['fit_frames']} frames in {fit['fit_seconds']:.0f} s; on {fit['frames']} "
            f"{fit['scored_on']}: reconstruction PSNR {fit['recon_psnr_db']:.2f} dB, objects missing {missing}"
        )
    _done(f"base pipeline ({preset}) -> {out}")


@app.command("train", context_settings={"allow_extra_args": False})
def train_cmd(
    recipe: Path = typer.Argument(..., help="Recipe YAML (see recipes/)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, dotted paths: train.lr=3e-4"),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest intact complete checkpoint."),
    trust_checkpoint: bool = typer.Option(
        False, "--trust-checkpoint", help="With --resume: let checkpoint files unpickle arbitrary types (that can run code)."
    ),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Processes (GPUs) on this node; >1 launches torchrun."),
    nnodes: int = typer.Option(1, "--nnodes", min=1, help="Nodes in all: run the same command on each, with its --node-rank."),
    node_rank: int = typer.Option(0, "--node-rank", min=0, help="This node's index, 0..nnodes-1 (node 0 hosts the rendezvous)."),
    master_addr: Optional[str] = typer.Option(None, "--master-addr", help="Node 0's address, reachable from every node."),
    master_port: Optional[int] = typer.Option(None, "--master-port", help="Node 0's rendezvous port (default 29500 across nodes)."),
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
    from lftk.train.launch import Topology, launch

    topo = Topology(nproc, nnodes, node_rank, master_addr, master_port).check()
    if dry_run:
        from lftk.train.memory import estimate, format_estimate

        typer.echo(format_estimate(estimate(cfg, world=nproc * nnodes), gpu_mem))
        return
    if topo.launches and "RANK" not in os.environ:
        flags = (["--resume"] if resume else []) + (["--trust-checkpoint"] if trust_checkpoint else [])
        raise typer.Exit(launch(topo, [str(recipe), *(overrides or [])] + flags))
    from lftk.train.loop import train

    run = train(cfg, resume=resume, trust_checkpoint=trust_checkpoint)
    if int(os.environ.get("RANK", 0)) == 0:
        _done(f"run: {run.root}\nfinal model: {run.final}\nnext: lftk eval {run.root} --data {cfg.data.path}")


# ---------------------------------------------------------------------------------------------- eval


@app.command("eval")
def eval_cmd(
    model: Optional[str] = typer.Argument(None, help="Run dir, pipeline dir or export dir."),
    data: Optional[Path] = typer.Option(None, "--data", help="Pair dir (its --split is used)."),
    baselines: str = typer.Option("copy,zero-shot,rollout", help="Comma-separated: copy, zero-shot, rollout."),
    out: Optional[Path] = typer.Option(None, help="Report dir (default: MODEL/eval or ./eval)."),
    steps: Optional[int] = typer.Option(None, min=1, help=f"Denoising steps (default: the model's, else {_SP.steps})."),
    guidance: Optional[float] = typer.Option(None, min=0.0, help=f"Text guidance scale (default: the model's, else {_SP.guidance})."),
    image_guidance: Optional[float] = typer.Option(None, min=0.0, help=f"Image guidance scale (default: the model's, else {_SP.image_guidance})."),
    keep: Optional[float] = typer.Option(
        None, min=0.0, max=255.0,
        help="Keep the current frame's pixels where the prediction changes less than this (0-255; 0 = off; default: the model's).",
    ),
    keep_objects: Optional[bool] = typer.Option(
        None, "--keep-objects/--no-keep-objects",
        help="Put back objects of the current frame that the prediction dropped (default: the model's).",
    ),
    backend: Optional[str] = typer.Option(
        None, help="Run the model through lftk's runner on torch | ort | trt, as infer and serve do (ort/trt: an export "
        "dir). Default: diffusers' pipeline.",
    ),
    precision: Optional[str] = typer.Option(
        None, help="With --backend: ort graphs fp32 | fp16 | int8; trt engines fp16 | int8; torch fp32 | fp16 | bf16.",
    ),
    split: str = typer.Option("test", help="Split to evaluate."),
    max_samples: Optional[int] = typer.Option(None, min=1, help="Evaluate at most this many pairs (spread over the split)."),
    rollout_steps: int = typer.Option(2, min=2, help="Rollout baseline: steps of the model fed its own outputs."),
    rollout_samples: int = typer.Option(8, min=1, help="Rollout baseline: samples rolled out."),
    batch_size: int = typer.Option(4, min=1, help="Samples per pipeline call."),
    seed: int = typer.Option(0),
    postprocess: Optional[str] = typer.Option(
        None, help="Also score the model's frames post-processed: color, sharpen or color,sharpen (one row per step and the chain)."
    ),
    compare: Optional[tuple[str, str]] = typer.Option(
        None, "--compare", help="Compare two existing reports (report dirs or run dirs): A B. No model runs."
    ),
) -> None:
    """Model vs baselines: whole-frame, motion-masked and trajectory metrics, 95% intervals, figures.

    Example: lftk eval runs/demo --data data/pairs --baselines copy,zero-shot,rollout
    Example: lftk eval exports/demo --data data/pairs --backend ort --precision int8   (what infer and serve run)
    Example: lftk eval --compare runs/demo runs/demo-lora
    """
    if compare and all(compare):
        if model is not None or data is not None:
            raise LftkError("--compare A B reads two existing reports: give no MODEL or --data with it")
        from lftk.eval.compare import compare_reports, format_comparison

        typer.echo(format_comparison(compare_reports(*compare)))
        return
    if model is None or data is None:
        raise LftkError("lftk eval needs MODEL and --data DIR (or --compare REPORT_A REPORT_B)")
    from lftk.eval.evaluate import evaluate
    from lftk.eval.report import summary_text
    from lftk.model.postprocess import parse_steps

    out = out or (Path(model) / "eval" if Path(model).is_dir() else Path("eval"))
    names = tuple(b.strip() for b in baselines.split(",") if b.strip())
    report = evaluate(
        model, data, out, split=split, steps=steps, guidance=guidance, image_guidance=image_guidance, seed=seed,
        max_samples=max_samples, baselines=names, keep=keep, keep_objects=keep_objects, backend=backend, precision=precision,
        batch_size=batch_size, rollout_steps=rollout_steps, rollout_samples=rollout_samples,
        postprocess=parse_steps(postprocess),
    )
    typer.echo(summary_text(report))
    _done(f"report: {out / 'report.md'} (json: {out / 'report.json'}; figures: {', '.join(report['figures'])})")


# ---------------------------------------------------------------------------------------------- export / deploy


@app.command("export")
def export_cmd(
    model: str = typer.Argument(..., help="Run dir, pipeline dir, or export dir (an export dir adds to itself)."),
    onnx: bool = typer.Option(
        True, "--onnx/--no-onnx", help="Export the fp32 ONNX graphs from torch (default); --no-onnx adds to an existing export."
    ),
    trt: bool = typer.Option(False, "--trt", help="Build TensorRT engines at --precision (needs a CUDA GPU and TensorRT)."),
    # Written from the export table (lftk.runtime.precision), which also validates the combination.
    precision: str = typer.Option("fp32", help=__import__("lftk.runtime.precision", fromlist=["_"]).precision_help()),
    dynamic_shape: bool = typer.Option(
        False, "--dynamic-shape", help="Dynamic image height/width (half to twice the trained side), not only batch."
    ),
    check_trt: bool = typer.Option(
        False, "--check-trt", help="Check every graph node against TensorRT's ONNX operator list, and the shape profiles (CPU)."
    ),
    calib: Optional[Path] = typer.Option(
        None, "--calib", help="int8 calibration pair dir (default: the run's training data, resolved_config.yaml data.path)."
    ),
    out: Optional[Path] = typer.Option(None, help="Export dir (default: MODEL/export; for an export dir, itself)."),
    check_merge: bool = typer.Option(
        False, "--check-merge", help="A LoRA run: rebuild the merge from the base and its adapters and check it against "
        "final/ (needs the base); default: export final/ as training merged it.",
    ),
) -> None:
    """Export a model (a run's final/ as written), ONNX (fp32, fp16, int8 Q/DQ) and TensorRT engines, with parity and checks.

    Example: lftk export runs/demo --onnx --precision int8 --check-trt --out exports/demo
    """
    from lftk.export.run import run_export

    summary = run_export(
        model, out, precision, onnx=onnx, trt=trt, dynamic_shape=dynamic_shape, check_trt=check_trt, calib=calib,
        check_merge=check_merge,
    )
    _done(f"export: {summary['out']} ({', '.join(summary['precisions'])})\n" + "\n".join(f"next: {c}" for c in summary["next"]))


@app.command("infer")
def infer_cmd(
    model: str = typer.Option(..., "--model", help="Export dir (ort/torch) or run/pipeline dir (torch)."),
    image: Optional[Path] = typer.Option(None, "--image", help="Current camera frame (default with --episode: its --start-frame)."),
    instruction: Optional[str] = typer.Option(
        None, "--instruction", help='e.g. "beat the block with the hammer" (default with --episode: its instruction).'
    ),
    backend: str = typer.Option("ort", help="torch | ort | trt"),
    frames: int = typer.Option(15, min=1, help="Rollout: future frames to predict, each from the one before."),
    mode: str = typer.Option("rollout", help="rollout (t+Δ, t+2Δ, ...) | sweep (one frame per --horizon, one batch)."),
    horizon: Optional[str] = typer.Option(
        None, help="Frames ahead: rollout: the step Δ (default: the model's); sweep: a list, e.g. 25,50,100 (default: all trained)."
    ),
    steps: Optional[int] = typer.Option(None, min=1, help=f"Denoising steps per frame (default: the model's, else {_SP.steps})."),
    seed: int = typer.Option(0, help="Same seed, same frames (on the same backend)."),
    guidance: Optional[float] = typer.Option(None, min=0.0, help=f"Text guidance scale (default: the model's, else {_SP.guidance})."),
    image_guidance: Optional[float] = typer.Option(None, min=0.0, help=f"Image guidance scale (default: the model's, else {_SP.image_guidance})."),
    keep: Optional[float] = typer.Option(
        None, min=0.0, max=255.0,
        help="Keep the current frame's pixels where the prediction changes less than this (0-255; 0 = off; default: the model's).",
    ),
    keep_objects: Optional[bool] = typer.Option(
        None, "--keep-objects/--no-keep-objects",
        help="Put back objects of the current frame that the prediction dropped (default: the model's).",
    ),
    scheduler: Optional[str] = typer.Option(
        None, help="euler_a (InstructPix2Pix's) | ddim | dpmpp (DPM-Solver++) | lcm (default: the model's: lcm for a "
        "distilled student, else euler_a)."
    ),
    postprocess: Optional[str] = typer.Option(None, help="color, sharpen or color,sharpen (off by default; README: Post-processing)."),
    episode: Optional[Path] = typer.Option(None, help="Episode dir: start from its frame and write its true frames beside the predictions."),
    start_frame: int = typer.Option(0, min=0, help="With --episode: the frame to start from."),
    mp4: bool = typer.Option(False, "--mp4", help="Also write rollout.mp4 (needs PyAV)."),
    compile: bool = typer.Option(
        False, "--compile", help="torch backend: torch.compile (CUDA graphs on GPU), channels-last; first call compiles (minutes)."
    ),
    out: Path = typer.Option(Path("infer_out"), help="Output dir for frames, GIF and timing.json."),
    precision: Optional[str] = typer.Option(
        None, help="ort graphs: fp32 (default) | fp16 | int8; trt engines: fp16 (default) | int8; torch: fp32 | fp16 (GPU) | bf16."
    ),
) -> None:
    """Predict future frames: a rollout, or a sweep of horizons from one frame.

    Example: lftk infer --model exports/demo --image frame.jpg --instruction "stack blocks" --frames 15
    Example: lftk infer --model exports/demo --episode data/episodes/blocks_stack_easy/episode0 --frames 3
    """
    from lftk.deploy.infer import run_infer

    summary = run_infer(
        model, image, instruction, backend=backend, frames=frames, mode=mode, steps=steps, seed=seed, out=out,
        guidance=guidance, image_guidance=image_guidance, scheduler=scheduler, precision=precision,
        horizons=_int_list(horizon, "--horizon"), postprocess=postprocess, episode=episode, start_frame=start_frame,
        mp4=mp4, compile=compile, keep=keep, keep_objects=keep_objects,
    )
    _done(f"{summary['frames']} frame(s) in {summary['total_seconds']:.2f} s -> {out} (gif: {out / 'rollout.gif'})")


def _int_list(text: Optional[str], option: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise LftkError(f"{option} {text!r}: expected whole numbers separated by commas, e.g. 25,50,100") from None
    if not values or min(values) < 1:
        raise LftkError(f"{option} {text!r}: expected positive whole numbers")
    return values


@app.command("serve")
def serve_cmd(
    model: str = typer.Option(..., "--model", help="Export dir (ort/trt) or run/pipeline dir (torch)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; 0.0.0.0 for all interfaces (no authentication: mind who can reach it)."),
    port: int = typer.Option(8000, min=0, max=65535, help="TCP port (0: any free one, logged)."),
    backend: str = typer.Option("ort", help="torch | ort | trt"),
    precision: Optional[str] = typer.Option(
        None, help="Graphs the export holds: ort fp32 (default) | fp16 | int8; trt engines fp16 (default) | int8."
    ),
    scheduler: Optional[str] = typer.Option(
        None, help="euler_a (InstructPix2Pix's) | ddim | dpmpp (DPM-Solver++) | lcm (default: the model's: lcm for a "
        "distilled student, else euler_a)."
    ),
    max_batch: int = typer.Option(16, min=1, help="Most requests (start frames) batched into one runner call."),
    batch_wait_ms: float = typer.Option(
        10.0, min=0.0, help="How long an idle worker waits for more requests before it runs (latency vs batching)."
    ),
    max_queue: int = typer.Option(64, min=1, help="Requests waiting beyond this get 503 with Retry-After."),
    max_upload_mb: float = typer.Option(10.0, min=0.001, help="Largest request body (413 above)."),
    max_pixels: int = typer.Option(
        4096 * 4096, min=1, help="Largest image, width x height, read from its header before decoding (413 above)."
    ),
    max_prompt_chars: int = typer.Option(500, min=1, help="Longest instruction (422 above)."),
    max_frames: int = typer.Option(16, min=1, help="Longest rollout a request may ask for."),
    max_steps: int = typer.Option(100, min=1, help="Most denoising steps a request may ask for."),
) -> None:
    """Serve predictions over HTTP: POST /predict (multipart image + instruction -> base64 PNG frames),
    GET /healthz, GET /metrics (Prometheus). Concurrent requests share UNet calls. SIGTERM finishes
    the accepted requests, then exits 0.

    Example: lftk serve --model exports/demo --port 8000   (then: curl -F image=@frame.png -F instruction="stack blocks" -F frames=4 localhost:8000/predict)
    """
    from lftk.deploy.serve import run_server
    from lftk.deploy.validate import Limits

    limits = Limits(
        max_upload_bytes=int(max_upload_mb * 2**20), max_pixels=max_pixels, max_prompt_chars=max_prompt_chars,
        max_frames=max_frames, max_steps=max_steps,
    )
    run_server(
        model, host=host, port=port, backend=backend, precision=precision, scheduler=scheduler, max_batch=max_batch,
        batch_wait_ms=batch_wait_ms, max_queue=max_queue, limits=limits,
    )
    _done("serve: stopped")


@app.command("bench")
def bench_cmd(
    model: str = typer.Option(..., "--model", help="Export dir; or a pipeline/run dir, whose torch rows alone can run."),
    backends: str = typer.Option(
        "torch,diffusers,ort,trt",
        help="Comma-separated backends (one row per precision the export holds); diffusers: the stock pipeline, the peer.",
    ),
    resolution: Optional[int] = typer.Option(
        None, help="Frame size in px for a pipeline/run dir (default: trained size, else the VAE's); an export has its own."
    ),
    frames: int = typer.Option(15, help="Rollout length, and start frames batched into one call (at most 16)."),
    guidance: Optional[float] = typer.Option(None, min=0.0, help="Text guidance scale (default: the model's)."),
    image_guidance: Optional[float] = typer.Option(None, min=0.0, help="Image guidance scale (default: the model's)."),
    steps: Optional[str] = typer.Option(
        None, help="Denoising steps per frame, or several (1,2,4: rows at each, a distilled student's trade-off); "
        "default: a short run; the table says how many."
    ),
    repeats: Optional[int] = typer.Option(None, help="Timed repeats per row, after warm-up; medians are reported."),
    threads: Optional[int] = typer.Option(
        None, help="Intra-op threads for torch and onnxruntime alike (default: each library's choice; on a busy CPU try 1)."
    ),
    compile: bool = typer.Option(
        False, "--compile", help="Add a torch.compile row (fp16 + CUDA graphs on GPU); compiling takes minutes on CPU."
    ),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the rows here as a JSON list."),
    log_path: Optional[Path] = typer.Option(
        None, "--log", help="Append the rows, with time, machine and versions, as a JSON line (e.g. bench/results/bench_log.jsonl)."
    ),
) -> None:
    """Time backends side by side: ms per UNet step, ms per frame, frames/s (single and batched), memory, parity.

    Example: lftk bench --model exports/demo --backends torch,ort --frames 15 --json bench.json

    A full-size model on a GPU, no export needed: lftk bench --model models/sd15 --backends torch --compile
    --resolution 128 --steps 100
    """
    from lftk.deploy.bench import format_table, run_bench

    optional = {k: v for k, v in {"steps": _int_list(steps, "--steps"), "repeats": repeats}.items() if v is not None}
    rows = run_bench(
        model, backends.split(","), frames=frames, json_path=json_path, log_path=log_path, threads=threads,
        compile=compile, resolution=resolution, guidance=guidance, image_guidance=image_guidance, **optional,
    )
    typer.echo(format_table(rows))
    if json_path:
        _done(f"rows -> {json_path}")


@app.command("doctor")
def doctor_cmd() -> None:
    """What this machine has (Python, torch, CUDA, onnxruntime, DeepSpeed, ...) and what it can run.

    Example: lftk doctor
    """
    from lftk.doctor import report

    typer.echo(report())


def _strip_launcher_args(argv: list[str]) -> list[str]:
    """DeepSpeed's launcher appends --local_rank=N (unless --no_local_rank): take it into the
    environment, where DeepSpeed looks for it, rather than reject it as an unknown option."""
    out = []
    for i, arg in enumerate(argv):
        if arg.startswith("--local_rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg == "--local_rank" and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
        elif i > 0 and argv[i - 1] == "--local_rank":
            continue
        else:
            out.append(arg)
    return out


def main() -> None:
    sys.argv = _strip_launcher_args(sys.argv)
    try:
        app()
    except LftkError as exc:
        first, *rest = str(exc).splitlines() or [""]
        if "RANK" in os.environ:  # a launched rank: tell the launcher why, it has only torchrun's "child failed"
            from lftk.train.launch import record_failure

            record_failure(exc.exit_code, first)
        typer.echo(f"error: {first}", err=True)
        for line in rest:
            typer.echo(line, err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
