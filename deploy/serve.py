"""`lftk serve`: the rollout runner behind HTTP, with concurrent requests batched into shared UNet calls.

Endpoints
  POST /predict   multipart/form-data: `image` (file: PNG, JPEG, WebP or BMP), `instruction` (text),
                  optional `frames` (rollout length, default 1), `seed` (default 0), `steps`, `guidance`,
                  `image_guidance` (default: the model's, from its lftk_model.json, else lftk.runtime.params.SamplingParams'). Answers JSON
                  {"frames": [base64 PNG, ...], "resolution": R, "params": {...},
                   "timing": {"queue_ms", "compute_ms", "total_ms", "batch_size"}};
                  errors are {"error": "FIELD: reason", "field": FIELD} with a 4xx/5xx status
                  (see lftk.deploy.validate), 503 + Retry-After when the queue is full.
  GET  /healthz   200 {"status": "ok", model, backend, precision, resolution, ...} (the model is loaded
                  and has run one warm-up step before the port listens, so reachable means ready)
  GET  /metrics   Prometheus text (lftk.deploy.metrics)

Choices a user would ask about:
- starlette + uvicorn (+ python-multipart for the form parser): small, standard ASGI pieces, in the
  `serve` extra; nothing here needs the training stack.
- One process, one worker thread owning the runner (lftk.deploy.batcher). Scale out with more
  processes or containers, one per accelerator; several workers in one process would fight over it.
- The body is read with a byte cap before the multipart parser sees it, so an upload is cut at
  --max-upload-mb whatever its Content-Length says. Past the cap the rest is read and dropped (up to
  4x the cap) before the 413 goes out, so a client that sends everything first still gets the answer.
- Bound to 127.0.0.1 unless --host says otherwise: there is no authentication; put a proxy in front
  of anything reachable from other machines.
- SIGTERM or SIGINT: the listening socket closes, every accepted request is answered (queued ones
  included), then the process exits 0. A second SIGINT abandons what is left.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import importlib.util
import io
import logging
import signal
import socket
import threading
import time
from pathlib import Path

from PIL import Image

from lftk.deploy.batcher import Batcher, Job, QueueFull, Result, ShuttingDown
from lftk.deploy.metrics import CONTENT_TYPE, Metrics
from lftk.deploy.validate import FILE_FIELDS, InputError, Limits, parse_params
from lftk.errors import LftkError, NotAvailableError

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
CLIENT_CLOSED = 499  # nginx's code for a client that closed the connection before the answer: counted apart from 5xx
# A body over the cap is still read (and dropped) up to this many caps before the 413 goes out: a client
# that sends its whole body before reading the answer (most do) gets the 413, not a connection reset.
DRAIN_FACTOR = 4
_MODULES = {"starlette": "starlette", "uvicorn": "uvicorn", "python_multipart": "python-multipart"}


def require_serve_extra() -> None:
    """NotAvailableError naming what to install when the serve extra is missing."""
    missing = [pkg for mod, pkg in _MODULES.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise NotAvailableError(
            f"lftk serve needs the serve extra ({', '.join(missing)} not installed): pip install 'lftk[serve]' "
            "(in a source checkout: pip install -e '.[serve]')"
        )


def _prompt_checker(batcher: Batcher):
    """Refuse (422) before queueing what the model's prompt cannot state, e.g. a horizon a fixed-horizon
    model was not trained on, so one bad request never fails a batch it would share. Formatting a
    prompt only reads the runner's template: safe outside the worker thread."""

    runner = batcher.runner

    def check(params) -> None:
        fixed = "{horizon}" not in runner.prompt_template
        if params.horizon is not None and fixed and params.horizon not in runner.horizons:
            trained = f"{runner.horizons[0]} frames" if runner.horizons else "an offset it does not record"
            raise InputError(
                422, "horizon", f"{params.horizon}: this model predicts a fixed offset ({trained}); leave horizon out"
            )
        try:
            runner.prompt(params.instruction, params.horizon)
        except LftkError as exc:
            raise InputError(422, "horizon" if params.horizon is not None else "instruction", str(exc)) from None

    return check


def create_app(batcher: Batcher, limits: Limits, info: dict):
    """The ASGI app over a running batcher. `info` (model, backend, resolution, ...) is what /healthz shows;
    its "resolution" is the size images are decoded to. Closing the app's lifespan closes the batcher."""
    require_serve_extra()
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    from lftk.deploy.validate import decode_image

    metrics = batcher.metrics
    resolution = int(info["resolution"])
    check_prompt = _prompt_checker(batcher)

    async def healthz(request: Request):
        return JSONResponse({"status": "ok", **info, "queue_depth": batcher.depth})

    async def metrics_endpoint(request: Request):
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    from starlette.requests import ClientDisconnect

    async def predict(request: Request):
        t0 = time.perf_counter()
        metrics.request_started()
        status, frames = 500, 0
        try:
            params, image_bytes = await _read_request(request, limits)
            image = await run_in_threadpool(decode_image, image_bytes, resolution, limits.max_pixels)
            check_prompt(params)
            sampling = batcher.runner.sampling.overridden(
                steps=params.steps, guidance=params.guidance, image_guidance=params.image_guidance
            )
            ran = {**sampling.to_dict(), "scheduler": batcher.runner.scheduler_kind or sampling.scheduler}
            params = dataclasses.replace(params, **ran)  # the answer states what ran
            job = Job(
                image, params.instruction, params.frames, params.steps, params.guidance, params.image_guidance,
                params.seed, params.horizon,
            )
            future = batcher.submit(job)
            result: Result = await asyncio.wrap_future(future)
            encoded = await run_in_threadpool(lambda: [_png_base64(f) for f in result.frames])
            status, frames = 200, len(encoded)
            timing = {
                "queue_ms": round(1000 * result.queued_s, 2),
                "compute_ms": round(1000 * result.compute_s, 2),
                "total_ms": round(1000 * (time.perf_counter() - t0), 2),
                "batch_size": result.batch_size,
            }
            return JSONResponse({"frames": encoded, "resolution": resolution, "params": dataclasses.asdict(params), "timing": timing})
        except InputError as exc:
            status = exc.status
            return _error(exc.status, str(exc), exc.field)
        except (QueueFull, ShuttingDown) as exc:
            status = 503
            return _error(503, f"busy: {exc}; retry in {RETRY_AFTER_S} s", None, {"Retry-After": str(RETRY_AFTER_S)})
        except LftkError as exc:  # the runner refused the inputs (they passed the checks above)
            status = 422
            return _error(422, str(exc), None)
        except ClientDisconnect:  # the client went away mid-upload: its fault, not ours, and nobody reads an answer
            status = CLIENT_CLOSED
            log.info("client disconnected before its request was read: %s", request.client)
            return _error(CLIENT_CLOSED, "client disconnected", None)
        except Exception as exc:  # noqa: BLE001 - the client gets a reason, the log the traceback
            log.exception("predict failed")
            return _error(500, f"internal error: {type(exc).__name__}: {exc}", None)
        finally:
            metrics.request_done(status, time.perf_counter() - t0, frames)

    async def http_error(request: Request, exc: HTTPException):
        # 404/405 and the like in the same JSON shape as ours
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None, exc.headers)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn gets here after every request task ended; the queue is empty, the worker idle.
        await run_in_threadpool(batcher.close)
        log.info("stopped: %d request(s) answered", sum(metrics.requests.values()))

    def _error(status: int, message: str, field: str | None, headers: dict | None = None):
        body = {"error": message} if field is None else {"error": message, "field": field}
        return JSONResponse(body, status_code=status, headers=headers)

    routes = [
        Route("/predict", predict, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)


async def _read_request(request, limits: Limits) -> tuple:
    """(Params, image bytes) from a multipart body, read under the byte cap; InputError otherwise."""
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException
    from starlette.requests import Request

    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise InputError(
            415, "content-type", f"POST /predict takes multipart/form-data (image file + instruction), got {content_type or 'none'!r}"
        )
    cap = limits.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > DRAIN_FACTOR * cap:
        # Far too big to be worth reading: answer now (a client still sending may see a reset instead).
        raise InputError(413, "body", f"{int(declared)} bytes, over the limit of {cap} (--max-upload-mb)")
    chunks, size = [], 0
    async for chunk in request.stream():  # counted as it arrives: chunked or lying uploads are cut too
        size += len(chunk)
        if size > DRAIN_FACTOR * cap:
            break
        if size <= cap:
            chunks.append(chunk)
    if size > cap:
        raise InputError(413, "body", f"{'over ' if size > DRAIN_FACTOR * cap else ''}{size} bytes, over the limit of {cap} (--max-upload-mb)")
    body = b"".join(chunks)

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    # A fresh Request over the bytes already read: the multipart parser streams from `receive`.
    form_request = Request(request.scope, replay)
    try:
        form = await form_request.form(max_files=len(FILE_FIELDS), max_fields=16, max_part_size=limits.max_upload_bytes)
    except MultiPartException as exc:
        raise InputError(400, "body", f"malformed multipart body ({exc.message})") from None
    except HTTPException as exc:  # how starlette hands on parser errors inside an app
        raise InputError(400, "body", f"malformed multipart body ({exc.detail})") from None
    try:
        texts, upload = [], None
        for name, value in form.multi_items():
            if name in FILE_FIELDS:
                if isinstance(value, str):
                    raise InputError(422, name, "must be a file part (curl: -F image=@frame.png)")
                upload = value
            elif not isinstance(value, str):
                raise InputError(422, name, "must be a text field, not a file")
            else:
                texts.append((name, value))
        params = parse_params(texts, limits)
        if upload is None:
            raise InputError(422, "image", "missing: a file part named 'image' (curl: -F image=@frame.png)")
        return params, await upload.read()
    finally:
        await form.close()


def _png_base64(frame) -> str:
    buf = io.BytesIO()
    Image.fromarray(frame, "RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads, so a taken port fails in a second, not after
    a minute of loading. LftkError naming the address when it cannot be bound."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise LftkError(f"--host {host}: cannot resolve ({exc})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart must not wait out TIME_WAIT
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise LftkError(f"cannot listen on {host}:{port} ({exc.strerror}): pick another --port or --host") from None
    return sock


def run_server(
    model: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    backend: str = "ort",
    precision: str | None = None,
    scheduler: str | None = None,
    max_batch: int = 16,
    batch_wait_ms: float = 10.0,
    max_queue: int = 64,
    limits: Limits = Limits(),
) -> None:
    """Load MODEL, warm it up, serve until SIGTERM/SIGINT, finish what was accepted, return."""
    require_serve_extra()
    import uvicorn

    from lftk.predictor import load

    # python-multipart logs a warning per malformed body: a client could fill the log with them.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    sock = bind_socket(host, port)
    try:
        t0 = time.perf_counter()
        predictor = load(model, backend, precision=precision, scheduler=scheduler)  # the Python API's loader
        runner, be = predictor.runner, predictor.backend  # the batcher shares UNet calls across requests
        _warm_up(runner)
        log.info("model loaded and warmed up (%.1f s)", time.perf_counter() - t0)
        info = {
            "model": str(model),
            "backend": be.name,
            "precision": getattr(be, "precision", "fp32"),
            "providers": be.providers,
            "resolution": runner.resolution,
            "scheduler": predictor.scheduler,
            "horizons": runner.horizons,
            "max_batch": max_batch,
            "limits": vars(limits),
        }
        metrics = Metrics()
        batcher = Batcher(runner, max_batch=max_batch, batch_wait_ms=batch_wait_ms, max_queue=max_queue, metrics=metrics)
        app = create_app(batcher, limits, info)
        server = _make_server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on"), metrics)
        bound = sock.getsockname()
        if not _is_loopback(host):
            log.warning("listening on %s: reachable from other machines, and lftk serve has no authentication", host)
        shown = f"[{host}]" if ":" in host else host  # an IPv6 literal in a URL goes in brackets
        log.info("serving %s on http://%s:%d (POST /predict, GET /healthz, GET /metrics)", model, shown, bound[1])
        server.run(sockets=[sock])
    finally:
        sock.close()
    if server.force_exit:
        log.warning("forced exit: requests still in flight were dropped")


def _warm_up(runner) -> None:
    """One 1-step prediction: the first real request should not pay for session set-up, and a model
    that cannot run should fail here, before the port listens."""
    import numpy as np

    r = runner.resolution
    runner.rollout(np.zeros((r, r, 3), np.uint8), "warm up", 1, steps=1)


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _make_server(config, metrics: Metrics):
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but a signal ends it with exit 0: uvicorn re-raises the signal after its
        graceful shutdown (so a plain `uvicorn` run dies by it), while `lftk serve` has then done
        exactly what was asked and should say so."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield  # signals reach only the main thread: an embedding caller stops us with should_exit
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame):
            if not self.should_exit:
                log.info("%s: finishing %d request(s) in flight, then exiting", signal.Signals(sig).name, metrics.in_flight)
            super().handle_exit(sig, frame)

    return Server(config)
