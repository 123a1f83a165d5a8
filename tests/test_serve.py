"""`lftk serve`: the real server in a subprocess on loopback over the tiny ONNX export (ort backend), plus
the batch worker and the backpressure path against a scripted runner (no model, no waiting on ORT)."""

from __future__ import annotations

import base64
import io
import json
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import subprocess_env
from PIL import Image

from lftk.deploy.batcher import Batcher, Job, QueueFull, ShuttingDown
from lftk.deploy.metrics import Metrics, parse_samples
from lftk.errors import LftkError, NotAvailableError
from lftk.runtime.params import SamplingParams

REPO = Path(__file__).resolve().parent.parent
RES = 64  # the tiny model's resolution
# The module server's limits, small so that each is cheap to cross.
LIMITS = ["--max-upload-mb", "1", "--max-pixels", "1000000", "--max-prompt-chars", "100", "--max-frames", "4", "--max-steps", "30"]


# ------------------------------------------------------------------------------------------- helpers


def _png(width: int = 96, height: int = 80, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)  # smooth: resizing it is not all noise
    buf = io.BytesIO()
    Image.fromarray(small).resize((width, height), Image.BILINEAR).save(buf, format="PNG")
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header (right CRCs) claims width x height, followed by a few bytes of pixel data:
    Pillow opens it; decoding would fail on the missing rows, so a 413 shows the header was checked first."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _multipart(fields: dict, files: dict) -> tuple[bytes, str]:
    boundary = "lftk-test-boundary-7d1f"
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data) in files.items():
        out.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
        )
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def _send(url: str, data, content_type: str, timeout: float = 120) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/predict", data=data, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {**json.loads(exc.read()), "_retry_after": exc.headers.get("Retry-After")}


def _post(url: str, fields: dict, image: bytes | None = None, timeout: float = 120) -> tuple[int, dict]:
    files = {"image": ("frame.png", image)} if image is not None else {}
    return _send(url, *_multipart(fields, files), timeout=timeout)


def _get(url: str, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(url + path, timeout=30) as resp:
        return resp.status, resp.read().decode()


def _metrics(url: str) -> dict[str, float]:
    return parse_samples(_get(url, "/metrics")[1])


def _frames(out: dict) -> list[np.ndarray]:
    frames = []
    for b64 in out["frames"]:
        with Image.open(io.BytesIO(base64.b64decode(b64))) as img:
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (RES, RES)
            frames.append(np.asarray(img))
    return frames


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


class Served:
    """`lftk serve` in a subprocess on 127.0.0.1, port chosen by the OS (read back from its log)."""

    def __init__(self, model: Path, log_path: Path, *args: str):
        self.log_path = log_path
        cmd = [sys.executable, "-m", "lftk.cli", "serve", "--model", str(model), "--port", "0", *args]
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        self.url = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"lftk serve exited with {self.proc.returncode}:\n{self.log()}")
            if self.url is None:
                found = re.search(r"on (http://127\.0\.0\.1:\d+)", self.log())
                self.url = found.group(1) if found else None
            if self.url is not None:
                try:
                    if _get(self.url, "/healthz")[0] == 200:
                        return
                except OSError:
                    pass  # bound, not listening yet
            time.sleep(0.1)
        self.proc.kill()
        pytest.fail(f"lftk serve did not come up in 120 s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tiny_export_dir, tmp_path_factory):
    served = Served(tiny_export_dir, tmp_path_factory.mktemp("serve") / "serve.log", "--batch-wait-ms", "20", *LIMITS)
    yield served
    assert served.stop() == 0, served.log()


@pytest.fixture(scope="module")
def runner(tiny_export_dir):
    from lftk.runtime.backends import open_backend
    from lftk.runtime.runner import Runner

    return Runner.from_backend(open_backend(tiny_export_dir, "ort"))


# ------------------------------------------------------------------------------ the real server


def test_predict_returns_the_runners_frames(server, runner, tmp_path):
    from lftk.data.images import load_rgb

    png = _png()
    status, out = _post(server.url, {"instruction": "stack blocks", "frames": 3, "steps": 2, "seed": 7}, png)
    assert status == 200, out
    got = _frames(out)
    assert len(got) == 3
    assert out["params"] == {"instruction": "stack blocks", "frames": 3, "steps": 2, "seed": 7, "guidance": 7.5,
                             "image_guidance": 1.5, "horizon": None, "keep": 0.0, "keep_objects": False, "scheduler": "euler_a"}
    assert out["resolution"] == RES and out["timing"]["batch_size"] >= 1 and out["timing"]["compute_ms"] > 0
    (tmp_path / "f.png").write_bytes(png)
    want = runner.rollout(load_rgb(tmp_path / "f.png", RES), "stack blocks", 3, steps=2, seed=7)
    for k, (a, b) in enumerate(zip(got, want)):
        assert _psnr(a, b) >= 40, f"frame {k + 1}: {_psnr(a, b):.1f} dB against Runner.rollout"
    assert not np.array_equal(got[0], got[1])  # a rollout, not one frame repeated

    health = json.loads(_get(server.url, "/healthz")[1])
    assert health["status"] == "ok" and health["backend"] == "ort" and health["resolution"] == RES


def _bad_requests() -> list:
    png = _png()
    ok = {"instruction": "stack blocks", "steps": 2}
    return [
        # (what, fields, image bytes, status, field, words in the reason)
        ("body over --max-upload-mb", ok, np.random.default_rng(0).bytes(1_300_000), 413, "body", "max-upload-mb"),
        ("header claims 2000x2000 px", ok, _png_claiming(2000, 2000), 413, "image", "max-pixels"),
        ("header claims 100k x 100k px", ok, _png_claiming(100_000, 100_000), 413, "image", "pixels"),
        ("truncated PNG", ok, png[: len(png) // 2], 422, "image", "truncated"),
        ("text, not an image", ok, b"hello, I am not a picture", 415, "image", "PNG"),
        ("empty file", ok, b"", 422, "image", "empty"),
        ("no image", ok, None, 422, "image", "missing"),
        ("no instruction", {"steps": 2}, png, 422, "instruction", "missing"),
        ("blank instruction", {"instruction": "   "}, png, 422, "instruction", "empty"),
        ("prompt over --max-prompt-chars", {"instruction": "x" * 101}, png, 422, "instruction", "max-prompt-chars"),
        ("frames over --max-frames", {**ok, "frames": 5}, png, 422, "frames", "1..4"),
        ("frames 0", {**ok, "frames": 0}, png, 422, "frames", "out of range"),
        ("steps over --max-steps", {**ok, "steps": 31}, png, 422, "steps", "max-steps"),
        ("steps not a number", {**ok, "steps": "many"}, png, 422, "steps", "not an integer"),
        ("negative seed", {**ok, "seed": -1}, png, 422, "seed", "out of range"),
        ("guidance inf", {**ok, "guidance": "inf"}, png, 422, "guidance", "out of range"),
        ("unknown field", {**ok, "frame": 2}, png, 422, "frame", "unknown field"),
        ("horizon not a number", {**ok, "horizon": "soon"}, png, 422, "horizon", "not an integer"),
        # The tiny model's prompt has no {horizon}: it cannot be asked for another offset.
        ("horizon of a fixed-offset model", {**ok, "horizon": 50}, png, 422, "horizon", "fixed offset"),
    ]


@pytest.mark.parametrize("case", _bad_requests(), ids=lambda c: c[0])
def test_bad_request_gets_its_4xx_and_the_server_keeps_serving(server, case):
    what, fields, image, status, field, words = case
    before = _metrics(server.url)
    got, out = _post(server.url, fields, image)
    assert got == status, f"{what}: {got} {out}"
    assert out["field"] == field and out["error"].startswith(f"{field}: ") and words in out["error"], out
    after = _metrics(server.url)
    key = f'lftk_requests_total{{code="{status}"}}'
    assert after[key] == before.get(key, 0) + 1
    ok, out = _post(server.url, {"instruction": "stack blocks", "steps": 1}, _png())
    assert ok == 200 and len(out["frames"]) == 1


def test_malformed_bodies_get_4xx(server):
    status, out = _send(server.url, b'{"instruction": "x"}', "application/json")
    assert status == 415 and out["field"] == "content-type" and "multipart/form-data" in out["error"]
    status, out = _send(server.url, b"--nope\r\ngarbage", "multipart/form-data; boundary=other")
    assert status == 400 and out["field"] == "body" and "malformed multipart" in out["error"]
    # a chunked upload (no Content-Length) is cut at the cap too, not read to its end
    chunks = iter([b"\0" * 65536] * 40)  # 2.5 MB against a 1 MB cap
    status, out = _send(server.url, chunks, "multipart/form-data; boundary=x")
    assert status == 413 and out["field"] == "body", out
    with pytest.raises(urllib.error.HTTPError) as info:
        _get(server.url, "/nowhere")
    assert info.value.code == 404 and "error" in json.loads(info.value.read())


def test_fifty_concurrent_requests_are_batched_and_match_their_solo_frames(server):
    png = _png(seed=1)

    def fields(i):
        return {"instruction": f"task {i % 5}", "seed": i, "frames": 1 + i % 2, "steps": 2}

    solo = {i: _frames(_post(server.url, fields(i), png)[1]) for i in (0, 3, 7)}  # alone: nothing else in flight
    before = _metrics(server.url)
    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda i: _post(server.url, fields(i), png), range(50)))
    after = _metrics(server.url)

    assert [s for s, _ in results] == [200] * 50, [o for s, o in results if s != 200][:3]
    assert [len(o["frames"]) for _, o in results] == [1 + i % 2 for i in range(50)]
    batches = after["lftk_batches_total"] - before["lftk_batches_total"]
    assert after["lftk_batch_size_sum"] - before["lftk_batch_size_sum"] == 50  # each request in exactly one call
    assert batches < 50, f"{batches} runner calls for 50 concurrent requests: nothing was batched"
    assert max(o["timing"]["batch_size"] for _, o in results) > 1
    assert after['lftk_requests_total{code="200"}'] - before['lftk_requests_total{code="200"}'] == 50
    assert after["lftk_requests_in_flight"] == 0 and after["lftk_queue_depth"] == 0
    for i, frames in solo.items():
        batched = _frames(results[i][1])
        for a, b in zip(batched, frames):
            assert _psnr(a, b) >= 40, f"request {i}: batched vs alone {_psnr(a, b):.1f} dB"
    # different seeds and instructions gave different frames: the batch did not mix requests up
    assert not np.array_equal(_frames(results[0][1])[0], _frames(results[1][1])[0])


def test_sigterm_finishes_every_accepted_request_then_exits_0(tiny_export_dir, tmp_path):
    served = Served(tiny_export_dir, tmp_path / "serve.log", "--max-batch", "2")
    try:
        png = _png(seed=2)
        with ThreadPoolExecutor(6) as pool:
            futures = [
                pool.submit(_post, served.url, {"instruction": "hammer", "seed": i, "frames": 3, "steps": 10}, png)
                for i in range(6)
            ]
            deadline = time.monotonic() + 30
            while _metrics(served.url)["lftk_requests_in_flight"] < 6:  # all six accepted: now stop it
                assert time.monotonic() < deadline, "requests never all in flight"
                time.sleep(0.01)
            served.proc.send_signal(signal.SIGTERM)
            results = [f.result(timeout=120) for f in futures]
        assert [s for s, _ in results] == [200] * 6, results
        assert all(len(o["frames"]) == 3 for _, o in results)
        assert served.proc.wait(timeout=60) == 0, served.log()
        assert "SIGTERM: finishing" in served.log() and "6 request(s) answered" in served.log()
        with pytest.raises(OSError):  # gone: nothing listens any more
            _get(served.url, "/healthz")
    finally:
        if served.proc.poll() is None:
            served.proc.kill()


def test_a_taken_port_fails_fast_with_exit_2(server, tiny_export_dir):
    port = server.url.rsplit(":", 1)[1]
    res = subprocess.run(
        [sys.executable, "-m", "lftk.cli", "serve", "--model", str(tiny_export_dir), "--port", port],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in res.stderr, res.stderr


# ------------------------------------------------------------------ batcher and app, scripted runner


class ScriptedRunner:
    """Frame k of a rollout is the start frame + k + 1; a closed gate holds the call (a busy accelerator)."""

    resolution = 4
    prompt_template, horizons = "{instruction}", []
    sampling = SamplingParams()  # the model's defaults, as Runner.from_backend reads them
    scheduler_kind = "euler_a"

    def prompt(self, instruction, horizon=None):
        return instruction

    def __init__(self, fail_on: str | None = None):
        self.calls: list[dict] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_on = fail_on

    def rollout_many(self, images, instructions, frames, steps, guidance, image_guidance, seeds, horizons=None):
        self.calls.append({"n": len(images), "steps": steps, "instructions": list(instructions), "horizons": horizons})
        self.entered.set()
        assert self.gate.wait(30)
        if self.fail_on in instructions:
            raise LftkError(f"cannot do {self.fail_on}")
        return [[images[i] + k + 1 for k in range(frames[i])] for i in range(len(images))]


def _job(instruction: str, steps: int = 2, frames: int = 1, value: int = 0) -> Job:
    return Job(np.full((4, 4, 3), value, np.uint8), instruction, frames=frames, steps=steps)


def _hold(runner: ScriptedRunner, batcher: Batcher) -> Job:
    """Put the worker inside a runner call that waits for runner.gate."""
    runner.gate.clear()
    runner.entered.clear()
    first = _job("first")
    batcher.submit(first)
    assert runner.entered.wait(10)
    return first


def test_batcher_groups_compatible_jobs_oldest_first_up_to_max_batch():
    runner = ScriptedRunner()
    batcher = Batcher(runner, max_batch=3, batch_wait_ms=0, max_queue=10)
    first = _hold(runner, batcher)
    jobs = [_job("a", 2, 1, 10), _job("b", 3, 2, 20), _job("c", 2, 3, 30), _job("d", 2, 1, 40), _job("e", 2, 2, 50)]
    futures = [batcher.submit(j) for j in jobs]
    assert batcher.depth == 5 and batcher.metrics.queue_depth == 5
    runner.gate.set()
    results = [f.result(timeout=10) for f in futures]
    assert first.future.result(timeout=10).batch_size == 1
    # a, c, d share steps=2 (max 3 a call); b (steps=3) is next oldest; e waits for the next steps=2 call
    assert [(c["n"], c["steps"], c["instructions"]) for c in runner.calls] == [
        (1, 2, ["first"]), (3, 2, ["a", "c", "d"]), (1, 3, ["b"]), (1, 2, ["e"])
    ]
    for job, res in zip(jobs, results):
        assert [int(f[0, 0, 0]) for f in res.frames] == [int(job.image[0, 0, 0]) + k + 1 for k in range(job.frames)]
    assert [r.batch_size for r in results] == [3, 1, 3, 3, 1]
    assert batcher.metrics.batches == 4 and batcher.metrics.batch_size.sum == 6
    assert batcher.close(timeout=10)


def test_batcher_queue_limit_failures_and_draining_close():
    runner = ScriptedRunner(fail_on="bad")
    batcher = Batcher(runner, max_batch=4, batch_wait_ms=0, max_queue=2)
    _hold(runner, batcher)
    bad, good = batcher.submit(_job("bad")), batcher.submit(_job("good"))
    with pytest.raises(QueueFull, match="max-queue 2"):
        batcher.submit(_job("one too many"))
    closer = threading.Thread(target=batcher.close)
    closer.start()  # close while jobs wait: they are still run
    time.sleep(0.05)
    with pytest.raises(ShuttingDown):
        batcher.submit(_job("late"))
    runner.gate.set()
    closer.join(10)
    with pytest.raises(LftkError, match="cannot do bad"):  # the request at fault fails ...
        bad.result(timeout=10)
    assert [int(f[0, 0, 0]) for f in good.result(timeout=10).frames] == [1]  # ... not the one that shared its call
    assert not closer.is_alive()
    assert [c["instructions"] for c in runner.calls] == [["first"], ["bad", "good"], ["bad"], ["good"]]
    assert batcher.metrics.batches == 4


def _serve_in_thread(batcher, resolution: int):
    """(url, server, thread): `create_app` over `batcher` served by uvicorn in a thread, once it is up."""
    uvicorn = pytest.importorskip("uvicorn")
    from lftk.deploy.serve import _make_server, bind_socket, create_app
    from lftk.deploy.validate import Limits

    app = create_app(batcher, Limits(), {"resolution": resolution})
    sock = bind_socket("127.0.0.1", 0)
    server = _make_server(uvicorn.Config(app, log_config=None, lifespan="on"), Metrics())
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread


def test_full_queue_answers_503_with_retry_after():
    runner = ScriptedRunner()
    batcher = Batcher(runner, max_batch=1, batch_wait_ms=0, max_queue=1)
    url, server, thread = _serve_in_thread(batcher, runner.resolution)
    try:
        runner.gate.clear()
        png = _png(8, 8)
        with ThreadPoolExecutor(2) as pool:
            held = pool.submit(_post, url, {"instruction": "held"}, png)
            assert runner.entered.wait(10)
            queued = pool.submit(_post, url, {"instruction": "queued"}, png)
            while batcher.depth < 1:
                time.sleep(0.01)
            status, out = _post(url, {"instruction": "refused"}, png)
            assert status == 503 and out["_retry_after"] == "1" and "max-queue 1" in out["error"]
            runner.gate.set()
            assert held.result(timeout=10)[0] == 200 and queued.result(timeout=10)[0] == 200
        samples = parse_samples(_get(url, "/metrics")[1])
        assert samples['lftk_requests_total{code="503"}'] == 1 and samples['lftk_requests_total{code="200"}'] == 2
    finally:
        runner.gate.set()
        server.should_exit = True
        thread.join(10)
    assert not thread.is_alive() and batcher.close(timeout=1)


def test_a_client_gone_mid_upload_counts_as_499_without_a_traceback(caplog):
    import socket

    batcher = Batcher(ScriptedRunner(), max_batch=1, batch_wait_ms=0, max_queue=4)
    url, server, thread = _serve_in_thread(batcher, RES)
    port = int(url.rsplit(":", 1)[1])
    try:
        body, content_type = _multipart({"instruction": "stack"}, {"image": ("f.png", _png(8, 8))})
        with socket.create_connection(("127.0.0.1", port)) as client:  # says 10x the bytes it sends, then leaves
            client.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                           f"Content-Length: {10 * len(body)}\r\n\r\n".encode() + body[: len(body) // 2])
            time.sleep(0.3)
        deadline = time.monotonic() + 10
        while 'lftk_requests_total{code="499"}' not in parse_samples(_get(url, "/metrics")[1]):
            assert time.monotonic() < deadline, _get(url, "/metrics")[1]
            time.sleep(0.05)
        samples = parse_samples(_get(url, "/metrics")[1])
        assert samples['lftk_requests_total{code="499"}'] == 1 and 'lftk_requests_total{code="500"}' not in samples
        assert not [r for r in caplog.records if r.levelname == "ERROR"], "a client abort was logged as an error"
    finally:
        server.should_exit = True
        thread.join(10)
    assert batcher.close(timeout=1)


def test_metrics_exposition_is_prometheus_text():
    m = Metrics()
    m.request_started()
    m.request_done(200, 0.3, frames=2)
    m.batch_done(3, 0.2)
    text = m.render()
    assert text.endswith("\n") and "# TYPE lftk_request_seconds histogram" in text
    s = parse_samples(text)
    assert s['lftk_requests_total{code="200"}'] == 1 and s["lftk_frames_total"] == 2
    assert s['lftk_request_seconds_bucket{le="0.25"}'] == 0 and s['lftk_request_seconds_bucket{le="0.5"}'] == 1
    assert s['lftk_request_seconds_bucket{le="+Inf"}'] == s["lftk_request_seconds_count"] == 1
    assert s['lftk_batch_size_bucket{le="2"}'] == 0 and s['lftk_batch_size_bucket{le="4"}'] == 1
    assert s["lftk_requests_in_flight"] == 0 and s["lftk_batches_total"] == 1


# ------------------------------------------------------------------------------------------- CLI


def test_serve_help_has_an_example_and_missing_extra_names_the_install(monkeypatch):
    from typer.testing import CliRunner

    import lftk.deploy.serve as serve
    from lftk.cli import app

    result = CliRunner().invoke(app, ["serve", "--help"], terminal_width=200)
    assert result.exit_code == 0 and "Example: lftk serve" in " ".join(result.output.split())
    real = serve.importlib.util.find_spec
    monkeypatch.setattr(serve.importlib.util, "find_spec", lambda name: None if name == "uvicorn" else real(name))
    with pytest.raises(NotAvailableError, match=r"uvicorn not installed\): pip install 'lftk\[serve\]'"):
        serve.run_server("any-model")
