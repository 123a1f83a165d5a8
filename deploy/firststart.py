"""Entrypoint of the runtime image: TensorRT engines for this GPU at first start, then the command.

    python -m lftk.deploy.firststart serve --model /models/export --host 0.0.0.0 --port 8000

TensorRT engines belong to one GPU (compute capability) and one TensorRT version, so an image cannot
carry engines ready for every machine. Before `lftk serve` or `lftk infer` runs on TensorRT, the
export's engines are checked against this machine with `check_engines` (the check the trt backend
makes); when they are missing or stale they are built once, into the engine cache volume:

    lftk export WORK --no-onnx --trt --precision fp16 --out WORK

The model mount stays read-only. WORK is a working copy of the export under $LFTK_CACHE/exports:
its artifacts are symlinks into the mounted export, only its top-level records (manifest.json,
parity.json) are copied, because the export rewrites those. WORK is named after the source's path
and manifest digest, so a new export gets a new working copy, and a restart on the same GPU reuses
the engines it built. The engines themselves are content-addressed in $LFTK_TRT_CACHE (export/tensorrt.py),
so a fresh working copy of unchanged graphs is a cache hit, not a rebuild.

Backend: an explicit --backend is obeyed (trt on a machine without TensorRT is an error that names
what is missing). Without one, $LFTK_BACKEND decides (default auto): TensorRT when this machine has
a CUDA GPU and the TensorRT package, else onnxruntime, with a warning that says why. Other commands
(`doctor`, `bench`, `export`, ...) run unchanged.

Imports no torch until an engine check needs it, and nothing from the training extras.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

from lftk.errors import LftkError
from lftk.runtime.manifest import MANIFEST, check_engines, manifest_digest, read_manifest, verify_manifest

log = logging.getLogger("lftk.firststart")

PREPARED = ("serve", "infer")  # the commands that take --model and --backend
BACKEND_CHOICES = ("auto", "trt", "ort", "torch")
DEFAULT_TRT_PRECISION = "fp16"  # the trt backend's default (deploy/infer.py open_backend)
WORK_DIRS = "exports"  # under $LFTK_CACHE


def cache_root(env: dict) -> Path:
    return Path(env.get("LFTK_CACHE") or Path.home() / ".cache" / "lftk")


# --- the command line: read and set `--name value` / `--name=value` options --------------------------

def get_option(argv: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name:
            if i + 1 >= len(argv):
                raise LftkError(f"{name} needs a value")
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def set_option(argv: Sequence[str], name: str, value: str) -> list[str]:
    """argv with `name value` replacing the option's current value, or appended if it had none."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == name:
            out[i + 1] = value
            return out
        if arg.startswith(name + "="):
            out[i : i + 1] = [name, value]
            return out
    return out + [name, value]


# --- backend ---------------------------------------------------------------------------------------

def tensorrt_machine() -> dict:
    """What this machine offers TensorRT (export/tensorrt.py `machine`; imports torch)."""
    from lftk.runtime.trt_engine import machine

    return machine()


def choose_backend(argv: Sequence[str], env: dict, machine: Callable[[], dict] = tensorrt_machine) -> tuple[str, dict | None]:
    """(backend, TensorRT machine info when the backend is trt). An explicit --backend wins; else
    $LFTK_BACKEND; `auto` is trt when nothing is missing for it, else ort, with the reason logged."""
    explicit = get_option(argv, "--backend")
    wanted = explicit or env.get("LFTK_BACKEND") or "auto"
    if wanted not in BACKEND_CHOICES:
        source = "--backend" if explicit else "LFTK_BACKEND"
        raise LftkError(f"{source}={wanted!r}: choose one of {', '.join(BACKEND_CHOICES)}")
    if wanted in ("ort", "torch"):
        return wanted, None
    info = machine()
    if not info["missing"]:
        return "trt", info
    reason = " and ".join(info["missing"])
    if wanted == "trt":
        raise LftkError(f"the trt backend needs {reason}; run with --backend ort, or on a machine that has them")
    from lftk.runtime.ort_graph import DEFAULT_PROVIDERS  # what the ort backend runs on, said as it is

    log.warning("TensorRT backend not available: this machine lacks %s; running on onnxruntime instead "
                "(--backend ort, %s)", reason, ", ".join(DEFAULT_PROVIDERS))
    return "ort", None


# --- the working copy of a read-only export -----------------------------------------------------

def work_dir_for(model: Path, manifest: dict, root: Path) -> Path:
    """Where the working copy of `model` lives: one per (source path, manifest content)."""
    digest = manifest.get("digest") or manifest_digest(manifest)
    place = hashlib.sha256(str(model.resolve()).encode()).hexdigest()[:8]
    return root / WORK_DIRS / f"{model.resolve().name}-{digest[:12]}-{place}"


def make_working_copy(src: Path, dest: Path) -> Path:
    """A writable view of the export at `src`: top-level files copied (the export rewrites its records
    there), every file below symlinked (graphs, pipeline weights, engines: read, or replaced by unlinking
    first, never written through), directories real (new engines and graphs land in the copy). Built
    beside `dest` and renamed into place, so a crash leaves no half copy."""
    src = src.resolve()
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for folder, dirs, files in os.walk(src, followlinks=True):
        rel = Path(folder).relative_to(src)
        for d in dirs:
            (tmp / rel / d).mkdir()
        for f in files:
            if rel == Path("."):
                shutil.copyfile(src / f, tmp / f)
            else:
                (tmp / rel / f).symlink_to(Path(folder) / f)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """One container at a time prepares engines on a shared cache volume; the others wait, then reuse."""
    (root / WORK_DIRS).mkdir(parents=True, exist_ok=True)
    with open(root / WORK_DIRS / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another container is preparing engines in %s: waiting for it", root)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --- engines ------------------------------------------------------------------------------------------

def lftk_command() -> list[str]:
    exe = shutil.which("lftk")
    return [exe] if exe else [sys.executable, "-m", "lftk.cli"]


def export_argv(work: Path, precision: str) -> list[str]:
    """The engine build, as the docs show it (`lftk export WORK --no-onnx --trt --precision fp16 --out WORK`)."""
    return ["lftk", "export", str(work), "--no-onnx", "--trt", "--precision", precision, "--out", str(work)]


def run_export(work: Path, precision: str, env: dict) -> None:
    """Build the engines with the same `lftk export` a person would type; LftkError if it fails."""
    argv = export_argv(work, precision)
    log.info("building TensorRT %s engines for this GPU (minutes, once per GPU and TensorRT version): %s",
             precision, shlex.join(argv))
    done = subprocess.run(lftk_command() + argv[1:], env=env, check=False)
    if done.returncode != 0:
        raise LftkError(f"engine build failed (exit {done.returncode}): {shlex.join(argv)}; its log is above")


def engine_problem(export_dir: Path, manifest: dict, precision: str, info: dict) -> str | None:
    """Why the export's `precision` engines cannot run on this GPU and TensorRT, or None if they can."""
    try:
        check_engines(export_dir, manifest, precision, info["tensorrt"], info["compute_capability"])
    except LftkError as exc:
        return str(exc).split("; rebuild with")[0]  # the rebuild is what happens next
    return None


def prepare_engines(
    model: Path, precision: str, info: dict, env: dict, build: Callable[[Path, str, dict], None] = run_export
) -> Path:
    """An export dir whose `precision` engines fit this GPU and TensorRT: MODEL itself when its engines
    do, else its working copy in the cache volume, with engines built there if missing or stale.
    File hashes are checked once, on the working copy (and again by the backend that loads it)."""
    model = Path(model)
    manifest = read_manifest(model)  # not an export dir: refused here, naming the dir
    problem = engine_problem(model, manifest, precision, info)
    if problem is None:
        log.info("%s: its %s engines fit this GPU (%s, TensorRT %s)", model, precision, info["gpu"], info["tensorrt"])
        return model
    log.info("%s: engines not usable here: %s", model, problem)
    root = cache_root(env)
    work = work_dir_for(model, manifest, root)
    with locked(root):
        try:
            if not (work / MANIFEST).is_file():
                raise LftkError("none yet")
            work_manifest = verify_manifest(work)  # there, and its links still lead to the same bytes
        except LftkError as exc:
            log.info("working copy %s: making it (%s)", work, str(exc).split(";")[0])
            make_working_copy(model, work)
            work_manifest = verify_manifest(work)  # a changed source export is refused here, with its rebuild hint
        problem = engine_problem(work, work_manifest, precision, info)
        if problem is None:
            log.info("reusing the %s engines built at an earlier start: %s", precision, work)
            return work
        log.info("building engines in the working copy, since: %s", problem)
        build(work, precision, {**env, "LFTK_TRT_CACHE": env.get("LFTK_TRT_CACHE") or str(root / "trt")})
        problem = engine_problem(work, read_manifest(work), precision, info)
        if problem is not None:
            raise LftkError(f"{work}: the engines are still unusable after the build: {problem}")
    return work


# --- the whole start --------------------------------------------------------------------------------

def plan(argv: Sequence[str], env: dict, machine: Callable[[], dict] = tensorrt_machine,
         build: Callable[[Path, str, dict], None] = run_export) -> list[str]:
    """The lftk command line to run (without the leading `lftk`), after any engine preparation."""
    argv = list(argv)
    if not argv or argv[0] not in PREPARED or get_option(argv, "--model") is None or "--help" in argv:
        return argv  # lftk itself answers: its --help, its errors, other commands
    backend, info = choose_backend(argv, env, machine)
    argv = set_option(argv, "--backend", backend)
    if backend == "trt":
        precision = get_option(argv, "--precision") or DEFAULT_TRT_PRECISION
        work = prepare_engines(Path(get_option(argv, "--model")), precision, info, env, build)
        argv = set_option(set_option(argv, "--model", str(work)), "--precision", precision)
    if argv[0] == "serve":
        port, polled = get_option(argv, "--port"), env.get("LFTK_PORT")
        if port and polled and port != polled:
            log.warning("serving on port %s but the image's HEALTHCHECK polls LFTK_PORT=%s: set -e LFTK_PORT=%s",
                        port, polled, port)
    return argv


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        final = plan(argv, dict(os.environ))
    except LftkError as exc:
        log.error("%s", exc)
        sys.exit(exc.exit_code)
    log.info("running: %s", shlex.join(["lftk", *final]))
    cmd = lftk_command()
    # exec: lftk becomes the container's main process and gets `docker stop`'s SIGTERM itself.
    os.execv(cmd[0], cmd + final)


if __name__ == "__main__":
    main()
