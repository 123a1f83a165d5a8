"""One log line per export stage: its time, artifact and size, then ok / skipped / FAILED with the reason
(ultralytics' @try_export). The lines are also kept, so the export summary and the manifest hold them.

    with stage(report, "onnx", "unet") as st:
        files = export_component(...)
        st.done(files, "checker ok")
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

log = logging.getLogger("lftk.export")


def human_size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def files_size(files: Sequence[Path]) -> int:
    total = 0
    for f in files:
        f = Path(f)
        total += sum(p.stat().st_size for p in f.rglob("*") if p.is_file()) if f.is_dir() else f.stat().st_size
    return total


@dataclass
class Stage:
    name: str
    item: str = ""
    status: str = "ok"  # ok | skipped | FAILED
    seconds: float = 0.0
    artifact: str = ""
    bytes: int = 0
    note: str = ""
    warn: bool = False  # logged as a warning: the export goes on, but the user should know

    def done(self, files: Sequence[Path] | Path | None = None, note: str = "") -> None:
        """Record what the stage wrote (first path named in the line, sizes summed) and a short note."""
        if files is not None:
            files = [files] if isinstance(files, (str, Path)) else list(files)
            self.artifact = str(files[0]) if files else ""
            self.bytes = files_size(files)
        self.note = note

    def skip(self, reason: str, warn: bool = False) -> None:
        self.status, self.note, self.warn = "skipped", reason, warn

    def line(self) -> str:
        label = f"{self.name} {self.item}".strip()
        parts = [f"{label:<22}", f"{self.status:<7}", f"{self.seconds:6.1f} s"]
        if self.artifact:
            parts.append(self.artifact)
        if self.bytes:
            parts.append(f"({human_size(self.bytes)})")
        if self.note:
            parts.append(self.note if self.status == "ok" else f"- {self.note}")
        return "  ".join(parts)

    def as_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if v not in ("", None) and k != "warn"}


@dataclass
class Report:
    """The stages of one export, in order."""

    stages: list[Stage] = field(default_factory=list)

    def as_list(self) -> list[dict]:
        return [s.as_dict() for s in self.stages]

    @property
    def failed(self) -> list[Stage]:
        return [s for s in self.stages if s.status == "FAILED"]


@contextmanager
def stage(report: Report, name: str, item: str = "") -> Iterator[Stage]:
    """Time a stage and log its line; an exception logs a FAILED line with its message and propagates."""
    st = Stage(name, item)
    report.stages.append(st)
    t0 = time.perf_counter()
    try:
        yield st
    except BaseException as exc:
        st.seconds = time.perf_counter() - t0
        st.status = "FAILED"
        st.note = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.error(st.line())
        raise
    st.seconds = time.perf_counter() - t0
    (log.warning if st.warn else log.info)(st.line())
