"""A request queue and the one worker thread that owns the runner: concurrent predictions share UNet calls.

Why one thread: backends are not thread-safe (an ORT session may be, a TensorRT context and its
preallocated buffers are not, and the runner's prompt cache is plain dicts), and one batched call
beats several interleaved ones on any accelerator. Callers `submit` a `Job` from any thread and get a
`concurrent.futures.Future`; the worker

1. blocks until a job is queued, then waits until `batch_wait_ms` after the *oldest* queued job's
   arrival (a job that already waited while the worker was busy is not delayed further) or until
   `max_batch` jobs are queued;
2. takes the oldest job and every queued job that can share its runner call, up to `max_batch`, in
   arrival order. Jobs can share a call when their steps, guidance and image guidance are equal: the
   scheduler's timesteps and the guidance arithmetic are per call. Instructions, rollout lengths and
   seeds may differ: `Runner.rollout_many` gives each job its own generator, so a job's frames are the
   ones it would get alone;
3. runs `rollout_many` once and resolves each job's future. If a shared call fails, each of its jobs
   runs again alone, so one request the runner cannot do fails itself, not its batch mates (their
   frames alone are the frames they would have had in the batch); a failure never stops the worker.

The queue is bounded (`max_queue` waiting jobs): `submit` raises `QueueFull` rather than letting
latency grow without limit, and the server answers 503 with Retry-After. `close()` stops new
submissions, lets the worker finish every queued job, and joins it: nothing accepted is dropped.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from lftk.deploy.metrics import Metrics
from lftk.errors import LftkError

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds `max_queue` waiting jobs; try again shortly."""


class ShuttingDown(Exception):
    """The batcher was closed: it finishes what it has and takes nothing new."""


@dataclass
class Job:
    """One prediction request: a start frame at the runner's resolution and how to roll it out."""

    image: np.ndarray  # (H, W, 3) uint8, H = W = runner.resolution
    instruction: str
    frames: int = 1
    steps: int | None = None  # None: the runner's (the model's) default
    guidance: float | None = None
    image_guidance: float | None = None
    seed: int = 0
    horizon: int | None = None  # frames ahead per step; None: the model's own
    future: Future = field(default_factory=Future, repr=False)
    enqueued: float = field(default_factory=time.perf_counter, repr=False)

    @property
    def group(self) -> tuple:
        """Jobs with equal keys can share one runner call."""
        return (self.steps, self.guidance, self.image_guidance)


@dataclass
class Result:
    frames: list[np.ndarray]  # `frames` predictions, (H, W, 3) uint8 each
    queued_s: float  # submit -> its runner call started
    compute_s: float  # the runner call's wall time (shared with the batch)
    batch_size: int  # jobs in that call, this one included


class Batcher:
    def __init__(
        self,
        runner,
        max_batch: int = 16,
        batch_wait_ms: float = 10.0,
        max_queue: int = 64,
        metrics: Metrics | None = None,
    ):
        if max_batch < 1 or max_queue < 1 or batch_wait_ms < 0:
            raise LftkError(
                f"batcher: max_batch and max_queue must be >= 1 and batch_wait_ms >= 0 "
                f"(got {max_batch}, {max_queue}, {batch_wait_ms})"
            )
        self.runner = runner
        self.max_batch = int(max_batch)
        self.batch_wait_s = float(batch_wait_ms) / 1000.0
        self.max_queue = int(max_queue)
        self.metrics = metrics or Metrics()
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="lftk-batcher", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def submit(self, job: Job) -> Future:
        """Queue `job`; its future resolves to a `Result`. Raises QueueFull or ShuttingDown at once."""
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (--max-queue {self.max_queue})")
            job.enqueued = time.perf_counter()
            self._queue.append(job)
            self.metrics.set_queue_depth(len(self._queue))
            self._cond.notify()
        return job.future

    def close(self, timeout: float | None = None) -> bool:
        """Take no more jobs, finish the queued ones, stop the worker. True if it stopped within `timeout`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _take(self) -> list[Job] | None:
        """The next batch (see the module docstring), or None once closed and empty."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            deadline = self._queue[0].enqueued + self.batch_wait_s
            while len(self._queue) < self.max_batch and not self._closed:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
            key = self._queue[0].group
            taken, kept = [], collections.deque()
            for job in self._queue:
                (taken if job.group == key and len(taken) < self.max_batch else kept).append(job)
            self._queue = kept
            self.metrics.set_queue_depth(len(kept))
        # A future cancelled while it waited (its caller gave up) needs no frames.
        return [job for job in taken if job.future.set_running_or_notify_cancel()]

    def _run(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                break
            if jobs:
                self._run_batch(jobs)
        log.debug("batch worker stopped")

    def _run_batch(self, jobs: list[Job]) -> None:
        first = jobs[0]
        started = time.perf_counter()
        try:
            frames = self.runner.rollout_many(
                np.stack([j.image for j in jobs]),  # (B, H, W, 3) uint8, one start frame per job
                [j.instruction for j in jobs],
                [j.frames for j in jobs],
                first.steps,
                first.guidance,
                first.image_guidance,
                [j.seed for j in jobs],
                [j.horizon for j in jobs],
            )
        except Exception as exc:  # noqa: BLE001 - handed to the caller(s); the worker lives on
            self.metrics.batch_done(len(jobs), time.perf_counter() - started)
            log.error("runner call for %d request(s) failed: %s", len(jobs), exc, exc_info=not isinstance(exc, LftkError))
            if len(jobs) == 1:
                first.future.set_exception(exc)
            else:  # find the request(s) at fault: each runs alone
                for job in jobs:
                    self._run_batch([job])
            return
        compute = time.perf_counter() - started
        self.metrics.batch_done(len(jobs), compute)
        log.debug("batch of %d (%s steps, up to %d frames) in %.3f s", len(jobs), first.steps, max(j.frames for j in jobs), compute)
        for job, out in zip(jobs, frames):
            job.future.set_result(Result(out, started - job.enqueued, compute, len(jobs)))
