"""The images, built from this repository's Dockerfile and run: `make test-image` (tier `image`).

Needs root and Debian's packages (podman, runc, debootstrap: installed when missing). The production
bases (nvidia/cuda, l4t) come from registries; where none is reachable, a local Debian base made by
debootstrap stands in, swapped in by build argument, and is kept in podman's storage for the next run.
pip inside the build reaches the same package sources as this machine's pip (its config and local
wheel dirs are mounted read-only into the build; nothing of them is left in the image).

The CPU runtime image is built and run with a tiny export mounted read-only: its health check, a
/predict from the host equal to the host's runner for the same seed, a SIGKILL mid-request and a
restart, SIGTERM and a clean exit, and what is inside (uid, no training stack, `lftk doctor`). The
train image is built on the same base (its CUDA base swapped) and runs `lftk train` on a tiny recipe.
Each case prints its figures (build time, image size).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.image

REPO = Path(__file__).resolve().parent.parent
BASE_IMAGE = "localhost/lftk-test-base:bookworm"
RUNTIME_IMAGE = "localhost/lftk:runtime-cpu-test"
TRAIN_IMAGE = "localhost/lftk:train-cpu-test"
PORT = 18731
CONTAINERS_CONF = Path("/etc/containers/containers.conf")


def _run(*cmd: str, timeout: float = 1800, check: bool = True, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode:
        raise AssertionError(f"{' '.join(cmd)} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def _report(what: str) -> None:
    print(f"\n[image] {what}", file=sys.__stdout__, flush=True)


class Podman:
    """podman with runc (crun fails on this machine kind's cgroups), as root."""

    def __init__(self):
        self.runc = shutil.which("runc")

    def __call__(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return _run("podman", "--runtime", self.runc, *args, **kw)


def _install_tools() -> str | None:
    """None once podman, runc and debootstrap are here; else why they cannot be."""
    missing = [t for t in ("podman", "runc", "debootstrap") if shutil.which(t) is None]
    if missing:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            return f"{', '.join(missing)} missing, and installing needs root and apt-get"
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "podman", "runc", "debootstrap"]):
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode:
                return f"{' '.join(cmd)}: {res.stderr.strip()[-500:]}"
    if os.geteuid() != 0:
        return "building and running images here needs root"
    # runc (and crun) fail on setrlimit(RLIMIT_NOFILE) under podman's default ulimits on this kind of machine.
    if not CONTAINERS_CONF.exists():
        CONTAINERS_CONF.parent.mkdir(parents=True, exist_ok=True)
        CONTAINERS_CONF.write_text("[containers]\ndefault_ulimits = []\n")
    return None


def _debian_mirror() -> str:
    """The Debian URI this machine's apt uses (deb822 .sources or sources.list)."""
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for line in path.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    listing = Path("/etc/apt/sources.list")
    if listing.exists():
        for line in listing.read_text().splitlines():
            parts = line.split()
            if parts[:1] == ["deb"] and "security" not in line:
                return next(p for p in parts[1:] if p.startswith("http"))
    return "http://deb.debian.org/debian"


def _pip_mounts() -> list[str]:
    """-v options that give a build's pip this machine's effective pip config (as `pip config list`
    sees it, merged into one /etc/pip.conf) and the local dirs and files it names, read-only."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    conf: dict[str, str] = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        name = key.split(".", 1)[-1]
        if value and name in ("find-links", "extra-index-url", "index-url", "cert", "constraint", "default-timeout"):
            conf.setdefault(name, value.strip().strip("'\""))
    path = Path("/var/tmp/lftk-image-pip.conf")  # rewritten by every run
    path.write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in conf.items()))
    mounts, local = ["-v", f"{path}:/etc/pip.conf:ro"], set()
    for value in conf.values():
        for item in value.split():
            item = item[len("file://"):] if item.startswith("file://") else item
            if item.startswith("/") and Path(item).exists():
                local.add(str(Path(item).parent) if item.endswith("/simple") else item)
    for item in sorted(local):
        mounts += ["-v", f"{item}:{item}:ro"]
    return mounts


@pytest.fixture(scope="module")
def podman():
    why = _install_tools()
    if why is not None:
        pytest.skip(f"images cannot be built here: {why}")
    p = Podman()
    if p("image", "exists", BASE_IMAGE, check=False).returncode != 0:
        t0 = time.monotonic()
        rootfs = Path("/var/tmp/lftk-test-base-rootfs")
        shutil.rmtree(rootfs, ignore_errors=True)
        _run("debootstrap", "--variant=minbase", "--include=python3,python3-venv,python3-pip,ca-certificates",
             "bookworm", str(rootfs), _debian_mirror(), timeout=1800)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        _run("podman", "--runtime", p.runc, "import", "-", BASE_IMAGE, stdin=tar.stdout)
        tar.wait()
        shutil.rmtree(rootfs, ignore_errors=True)
        _report(f"local Debian base {BASE_IMAGE} made by debootstrap in {time.monotonic() - t0:.0f} s (cached for later runs)")
    return p


def _build(podman: Podman, target: str, tag: str, *args: str) -> float:
    t0 = time.monotonic()
    # --format docker: OCI image configs have no HEALTHCHECK, and podman drops it from them.
    podman("build", "--format", "docker", "--network", "host", *_pip_mounts(), "--target", target, *args, "-t", tag,
           str(REPO), timeout=3600)
    took = time.monotonic() - t0
    size = int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())
    _report(f"{tag} (--target {target} {' '.join(args)}): built in {took:.0f} s, {size / 2**20:.0f} MiB")
    return took


@pytest.fixture(scope="module")
def runtime_image(podman):
    _build(podman, "runtime", RUNTIME_IMAGE, "--build-arg", "RUNTIME_BASE=cpu", "--build-arg", f"CPU_BASE={BASE_IMAGE}",
           "--build-arg", "CPU_TORCH_INDEX=https://pypi.org/simple")
    return RUNTIME_IMAGE


@pytest.fixture(scope="module")
def export_mount(tiny_export_dir, tmp_path_factory):
    """The tiny export where the image's user (uid 10001) can read it (pytest's tmp dirs are 0700)."""
    root = Path(f"/var/tmp/lftk-image-export-{os.getpid()}")
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(tiny_export_dir, root / "export")
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield root / "export"
    shutil.rmtree(root, ignore_errors=True)


class Served:
    """The runtime image serving the export on the host network, port PORT, with a cache volume."""

    def __init__(self, podman: Podman, image: str, export: Path, volume: str):
        self.podman, self.name = podman, f"lftk-image-test-{os.getpid()}"
        self.url = f"http://127.0.0.1:{PORT}"
        podman("rm", "-f", self.name, check=False)
        podman("run", "-d", "--name", self.name, "--network", "host", "-e", f"LFTK_PORT={PORT}",
               "-v", f"{export}:/models/export:ro", "-v", f"{volume}:/cache", image,
               "serve", "--model", "/models/export", "--host", "127.0.0.1", "--port", str(PORT))

    def wait_healthy(self, timeout: float = 300) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            state = self.podman("inspect", "--format", "{{.State.Status}}", self.name).stdout.strip()
            assert state == "running", f"container {state}:\n{self.logs()}"
            res = self.podman("healthcheck", "run", self.name, check=False)
            if res.returncode == 0:
                return time.monotonic() - t0
            assert "no defined healthcheck" not in res.stderr, f"the image has no HEALTHCHECK: {res.stderr.strip()}"
            time.sleep(1)
        raise AssertionError(f"not healthy after {timeout} s:\n{self.logs()}")

    def logs(self) -> str:
        res = self.podman("logs", self.name, check=False)
        return (res.stdout + res.stderr)[-4000:]

    def exit_code(self) -> int:
        return int(self.podman("inspect", "--format", "{{.State.ExitCode}}", self.name).stdout.strip())

    def remove(self) -> None:
        self.podman("rm", "-f", self.name, check=False)


@pytest.fixture(scope="module")
def served(podman, runtime_image, export_mount):
    volume = f"lftk-image-test-cache-{os.getpid()}"
    podman("volume", "create", volume)
    s = Served(podman, runtime_image, export_mount, volume)
    took = s.wait_healthy()
    _report(f"runtime container healthy {took:.1f} s after start")
    yield s
    s.remove()
    podman("volume", "rm", "-f", volume, check=False)


def _predict(url: str, seed: int, frames: int = 2, timeout: float = 300) -> list[np.ndarray]:
    from test_serve import _frames, _png, _post

    status, out = _post(url, {"instruction": "stack blocks", "frames": frames, "steps": 2, "seed": seed}, _png(),
                        timeout=timeout)
    assert status == 200, out
    return _frames(out)


def _host_frames(export: Path, seed: int, frames: int = 2) -> list[np.ndarray]:
    from test_serve import RES, _png

    from lftk.data.images import load_rgb
    from lftk.runtime.backends import open_backend
    from lftk.runtime.runner import Runner

    png = export.parent / "frame.png"
    png.write_bytes(_png())
    runner = Runner.from_backend(open_backend(export, "ort"))
    return runner.rollout(load_rgb(png, RES), "stack blocks", frames, steps=2, seed=seed)


def test_the_cpu_runtime_serves_the_host_runners_frames(served, export_mount):
    from test_serve import _psnr

    got = _predict(served.url, seed=7)
    want = _host_frames(export_mount, seed=7)
    psnr = [_psnr(a, b) for a, b in zip(got, want)]
    _report("/predict from the host vs the host's runner, same seed: " + ", ".join(f"{p:.1f} dB" for p in psnr))
    assert len(got) == 2 and min(psnr) >= 40
    health = json.loads(urllib.request.urlopen(served.url + "/healthz", timeout=10).read())
    assert health["backend"] == "ort"


def test_inside_the_runtime_image(podman, runtime_image):
    uid = podman("run", "--rm", "--entrypoint", "id", runtime_image, "-u").stdout.strip()
    assert uid == "10001"
    probe = ("import importlib.util as u; print([m for m in ('deepspeed', 'peft', 'bitsandbytes') if u.find_spec(m)])")
    assert podman("run", "--rm", "--entrypoint", "python", runtime_image, "-c", probe).stdout.strip() == "[]"
    doctor = podman("run", "--rm", runtime_image, "doctor", check=False)
    _report(f"lftk doctor in the runtime image: exit {doctor.returncode}")
    assert doctor.returncode == 0, doctor.stdout[-2000:] + doctor.stderr[-2000:]
    assert "onnxruntime" in doctor.stdout


def test_a_kill_mid_request_and_a_restart_serve_again(served, export_mount):
    before = _predict(served.url, seed=11)
    errors: list[BaseException] = []

    def long_request():
        try:
            _predict(served.url, seed=12, frames=40, timeout=120)
        except BaseException as exc:  # the kill cuts it: expected
            errors.append(exc)

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(1.0)
    served.podman("kill", "--signal", "KILL", served.name)
    thread.join(timeout=60)
    assert errors, "the request finished before the kill: the case proves nothing"
    served.podman("start", served.name)
    took = served.wait_healthy()
    after = _predict(served.url, seed=11)
    _report(f"SIGKILL mid-request, restart: healthy again after {took:.1f} s, frames equal to before: "
            f"{all(np.array_equal(a, b) for a, b in zip(before, after))}")
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_sigterm_ends_the_server_cleanly(served):
    t0 = time.monotonic()
    served.podman("stop", "--time", "30", served.name)
    took = time.monotonic() - t0
    code = served.exit_code()
    _report(f"SIGTERM (podman stop): exit {code} after {took:.1f} s")
    assert code == 0, served.logs()
    assert took < 30, "the server ignored SIGTERM until podman's SIGKILL"


def test_the_train_image_builds_on_a_cpu_base_and_trains_a_tiny_recipe(podman, tiny_pairs_dir, tiny_pipeline_dir):
    _build(podman, "train", TRAIN_IMAGE, "--build-arg", f"CUDA_DEVEL_BASE={BASE_IMAGE}",
           "--build-arg", "TORCH_INDEX=https://pypi.org/simple")
    work = Path(f"/var/tmp/lftk-image-train-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(tiny_pairs_dir, work / "pairs")
    shutil.copytree(tiny_pipeline_dir, work / "base")
    (work / "runs").mkdir()
    for path in [work, *work.rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o644)
    try:
        t0 = time.monotonic()
        res = podman("run", "--rm", "-v", f"{work}:/work/data", TRAIN_IMAGE, "train", "/opt/lftk/recipes/demo.yaml",
                     "output_dir=/work/data/runs/tiny", "data.path=/work/data/pairs", "model.base=/work/data/base",
                     "max_steps=2", "train.batch_size=2", "train.val_samples=0", "sampling.guidance=7.5",
                     "sampling.image_guidance=1.5", check=False, timeout=900)
        took = time.monotonic() - t0
        _report(f"lftk train (tiny recipe, 2 steps, CPU) in the train image: exit {res.returncode} in {took:.0f} s")
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert (work / "runs" / "tiny" / "final" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    finally:
        shutil.rmtree(work, ignore_errors=True)
