"""A deadline on the parts of a training step that wait for other ranks.

NCCL enforces the process group's timeout itself; gloo does not always: a rank whose peer is alive
but silent (a stopped process, a hung host) can block in a large all-reduce's socket write for good,
long past `train.dist_timeout_s`. So while a multi-rank step is in a collective-bearing region, a
thread watches the clock; past the deadline it reports, in one line, what the run waited for and
which checkpoint is the newest complete one, and ends the process with exit code 2 (the stuck call
cannot be interrupted from Python, so it exits without unwinding).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

log = logging.getLogger(__name__)


class Watchdog:
    def __init__(self, timeout_s: float, message: Callable[[str], str], poll_s: float = 1.0):
        self.timeout_s = timeout_s
        self.message = message  # what -> the error line
        self.poll_s = min(poll_s, timeout_s / 4)
        self._armed: tuple[float, str] | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="lftk-dist-watchdog", daemon=True)
        self._thread.start()

    @contextmanager
    def watch(self, what: str) -> Iterator[None]:
        with self._lock:
            self._armed = (time.monotonic() + self.timeout_s, what)
        try:
            yield
        finally:
            with self._lock:
                self._armed = None

    def _run(self) -> None:
        while True:
            time.sleep(self.poll_s)
            with self._lock:
                armed = self._armed
            if armed is not None and time.monotonic() > armed[0]:
                self._fire(armed[1])

    def _fire(self, what: str) -> None:
        line = self.message(what)
        from lftk.train.launch import record_failure

        record_failure(2, line)
        print(f"error: {line}", file=sys.stderr, flush=True)
        os._exit(2)


@contextmanager
def nothing(what: str) -> Iterator[None]:
    """The single-rank stand-in for Watchdog.watch: nothing to wait for."""
    yield
