"""The server's counters, written out in the Prometheus text exposition format (version 0.0.4).

Hand-written rather than prometheus_client: the server needs five series, and one fewer dependency
keeps the serve extra small on an edge box. All updates take one lock, because the batch worker
thread and the event loop both write.

What is counted (only `POST /predict`; health checks and scrapes would drown the numbers):
  lftk_requests_total{code}   answered predict requests, by HTTP status code
  lftk_request_seconds        histogram: arrival to answer, every status
  lftk_batches_total          runner calls (`rollout_many`), one per group of compatible requests
  lftk_batch_size             histogram: requests (start frames) per runner call
  lftk_batch_seconds          histogram: wall time of one runner call
  lftk_frames_total           predicted frames returned
  lftk_queue_depth            gauge: requests waiting for the worker
  lftk_requests_in_flight     gauge: predict requests accepted and not yet answered
"""

from __future__ import annotations

import math
import threading
from typing import Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    """Cumulative buckets, a sum and a count, as Prometheus histograms are exposed."""

    def __init__(self, buckets: Sequence[float]):
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * len(self.bounds)  # per bucket, not cumulative; summed when written
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            out.append(f'{name}_bucket{{le="{_number(bound)}"}} {running}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {_number(self.sum)}")
        out.append(f"{name}_count {self.count}")
        return out


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[int, int] = {}  # status code -> answered requests
        self.request_seconds = Histogram(SECONDS_BUCKETS)
        self.batches = 0
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.batch_seconds = Histogram(SECONDS_BUCKETS)
        self.frames = 0
        self.queue_depth = 0
        self.in_flight = 0

    def request_started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def request_done(self, code: int, seconds: float, frames: int = 0) -> None:
        with self._lock:
            self.in_flight -= 1
            self.requests[code] = self.requests.get(code, 0) + 1
            self.request_seconds.observe(seconds)
            self.frames += frames

    def batch_done(self, size: int, seconds: float) -> None:
        with self._lock:
            self.batches += 1
            self.batch_size.observe(size)
            self.batch_seconds.observe(seconds)

    def set_queue_depth(self, depth: int) -> None:
        with self._lock:
            self.queue_depth = depth

    def render(self) -> str:
        """The exposition text: HELP and TYPE before each family, one sample a line, newline-terminated."""
        with self._lock:
            lines: list[str] = []
            _family(lines, "lftk_requests_total", "counter", "Answered POST /predict requests, by HTTP status code.")
            if not self.requests:
                lines.append('lftk_requests_total{code="200"} 0')  # an empty family confuses rate() users
            lines += [f'lftk_requests_total{{code="{code}"}} {n}' for code, n in sorted(self.requests.items())]
            _family(lines, "lftk_request_seconds", "histogram", "POST /predict time from arrival to answer.")
            lines += self.request_seconds.lines("lftk_request_seconds")
            _family(lines, "lftk_batches_total", "counter", "Runner calls; each serves one group of compatible requests.")
            lines.append(f"lftk_batches_total {self.batches}")
            _family(lines, "lftk_batch_size", "histogram", "Requests (start frames) per runner call.")
            lines += self.batch_size.lines("lftk_batch_size")
            _family(lines, "lftk_batch_seconds", "histogram", "Wall time of one runner call.")
            lines += self.batch_seconds.lines("lftk_batch_seconds")
            _family(lines, "lftk_frames_total", "counter", "Predicted frames returned.")
            lines.append(f"lftk_frames_total {self.frames}")
            _family(lines, "lftk_queue_depth", "gauge", "Requests waiting for the batch worker.")
            lines.append(f"lftk_queue_depth {self.queue_depth}")
            _family(lines, "lftk_requests_in_flight", "gauge", "POST /predict requests accepted and not yet answered.")
            lines.append(f"lftk_requests_in_flight {self.in_flight}")
        return "\n".join(lines) + "\n"


def _family(lines: list[str], name: str, kind: str, help_text: str) -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")


def _number(value: float) -> str:
    """Prometheus floats: integers without a trailing .0 (bucket labels read le="1", not "1.0")."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def parse_samples(text: str) -> dict[str, float]:
    """Exposition text -> {'name{labels}': value}; for tests and scripts that read /metrics."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples
