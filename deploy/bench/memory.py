"""Peak memory of a bench row: this process's resident set (a sampling thread) and CUDA's allocator."""

from __future__ import annotations

import os
import platform
import threading
from pathlib import Path

POLL_S = 0.05


def _rss_reader():
    """A function returning this process's resident bytes now: psutil (not a declared dependency)
    where installed, else /proc (Linux), else the lifetime peak from getrusage."""
    try:
        import psutil

        proc = psutil.Process()
        return lambda: proc.memory_info().rss
    except ImportError:
        pass
    statm = Path("/proc/self/statm")
    if statm.is_file():
        page = os.sysconf("SC_PAGE_SIZE")
        return lambda: int(statm.read_text().split()[1]) * page
    import resource

    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class PeakRss:
    """Peak resident memory of this process while the block runs, in MB (`.mb`)."""

    def __init__(self):
        self._rss = _rss_reader()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _sample(self):
        self.peak = max(self.peak, self._rss())

    def _poll(self):
        while not self._stop.wait(POLL_S):
            self._sample()

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def mb(self) -> float:
        return round(self.peak / 2**20, 1)


def cuda_peak_reset() -> bool:
    """Start CUDA's peak count over; False where this torch sees no CUDA GPU."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return True
    return False


def cuda_peak_mb() -> float:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1)
