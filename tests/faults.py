"""Kill-anywhere harness: SIGKILL a writer at points spread over its run, then check what it left.

For each writer (a CLI command and the output it makes) the harness runs the command once
uninterrupted (the reference: its output's digest, its duration, and when its first write shows up),
then for each kill point starts it again, SIGKILLs it at that moment and asks the writer's `state`
what the output is now:

- "absent": nothing that looks like output (staging leftovers are allowed: the next run removes them);
- "refused": something is there, and reading it gives a clear refusal (or a stated rebuild);
- "complete": the output is there; its digest must equal the reference's.

`lost` counts earlier good data the kill destroyed (a previous export or checkpoint that no longer
loads). Then the same command runs again (`rerun`, e.g. with --resume for training) and must exit 0
with output equal to the reference. Digests leave out what legitimately differs between runs:
timings and tool versions (keys such as `seconds`, `*_s`, `*_ms`, `time`, `stages`, `versions`).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# "digest": a manifest's digest covers its timings too; verify_manifest checks it on every read.
VOLATILE = {"seconds", "time", "timing", "stages", "versions", "elapsed_s", "tensorboard", "digest"}


def _volatile(key: str) -> bool:
    return key in VOLATILE or key.endswith(("_s", "_ms", "_seconds"))


def _normalise(value):
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items() if not _volatile(k)}
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    return value


def file_digest(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix in (".json", ".jsonl"):
        try:
            rows = [json.loads(line) for line in data.decode().splitlines() if line.strip()] if path.suffix == ".jsonl" \
                else [json.loads(data)]
            data = json.dumps(_normalise(rows), sort_keys=True).encode()
        except (ValueError, UnicodeDecodeError):
            pass  # not JSON after all: its bytes are its digest
    return hashlib.sha256(data).hexdigest()


def tree_digest(root: Path, skip: Callable[[Path], bool] = lambda p: False) -> dict[str, str]:
    """{relative path: digest} of every file under `root` (hidden staging leftovers and `skip` left out)."""
    root = Path(root)
    if root.is_file():
        return {root.name: file_digest(root)}
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts) and not skip(p):
            out[rel.as_posix()] = file_digest(p)
    return out


@dataclass
class Writer:
    name: str
    cmd: list[str]
    watch: Path  # the dir whose first new entry marks the first write
    state: Callable[[], tuple[str, int]]  # -> (absent | refused | complete, earlier data lost)
    digest: Callable[[], dict]
    reset: Callable[[], None]  # back to the starting state before each run
    rerun: Callable[[], list[str]] | None = None  # the command to run again after a kill (default: cmd)
    env: dict = field(default_factory=dict)
    cwd: Path | None = None


@dataclass
class Outcome:
    point_s: float
    state: str
    lost: int
    identical: bool | None  # for "complete": equal to the reference
    rerun_ok: bool
    rerun_identical: bool


def _listing(path: Path) -> frozenset:
    """Every path under `path`, recursively (a new file anywhere below is a write)."""
    found = []
    for dirpath, dirs, files in os.walk(path):
        found += [os.path.join(dirpath, n) for n in dirs + files]
    return frozenset(found)


def _start(w: Writer, cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, **w.env}
    with open(log, "w") as fh:
        return subprocess.Popen(cmd, cwd=w.cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)


def reference(w: Writer, log: Path, timeout: float = 600) -> tuple[dict, float, float]:
    """(digest, first write, last write) of one uninterrupted run, in seconds from its start: the
    watched dir's listing changing marks a write (what happens after the last one is interpreter exit)."""
    w.reset()
    seen = _listing(w.watch)
    t0 = time.monotonic()
    proc = _start(w, w.cmd, log)
    first = last = None
    while proc.poll() is None:
        now = _listing(w.watch)
        if now != seen:
            seen, last = now, time.monotonic() - t0
            first = last if first is None else first
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"{w.name}: reference run took over {timeout} s")
        time.sleep(0.01)
    total = time.monotonic() - t0
    assert proc.returncode == 0, f"{w.name}: reference run failed:\n{log.read_text()[-3000:]}"
    return w.digest(), (first if first is not None else 0.0), (last if last is not None else total)


def kill_points(first: float, last: float, n: int) -> list[float]:
    """n moments spread evenly from just before the first write to just after the last."""
    lo, hi = max(first - 0.05, 0.0), last + 0.05
    return [lo + (hi - lo) * (i + 0.5) / n for i in range(n)]


def kill_at(w: Writer, point_s: float, ref: dict, log: Path) -> Outcome:
    w.reset()
    proc = _start(w, w.cmd, log)
    deadline = time.monotonic() + point_s
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    state, lost = w.state()
    identical = (w.digest() == ref) if state == "complete" else None
    rerun_cmd = w.rerun() if w.rerun else w.cmd
    again = subprocess.run(rerun_cmd, cwd=w.cwd, env={**os.environ, **w.env}, capture_output=True, text=True,
                           timeout=600) if state != "complete" else None
    rerun_ok = again is None or again.returncode == 0
    rerun_identical = rerun_ok and w.digest() == ref
    if again is not None and again.returncode != 0:
        log.write_text(log.read_text() + "\n--- rerun ---\n" + again.stdout[-2000:] + again.stderr[-3000:])
    return Outcome(round(point_s, 2), state, lost, identical, rerun_ok, rerun_identical)


def probe(w: Writer, n: int, logs: Path) -> tuple[list[Outcome], str]:
    """Kill `w` at n points; returns the outcomes and the summary line."""
    logs.mkdir(parents=True, exist_ok=True)
    ref, first, last = reference(w, logs / f"{w.name}-reference.log")
    outcomes = [kill_at(w, t, ref, logs / f"{w.name}-kill{i}.log") for i, t in enumerate(kill_points(first, last, n))]
    counts = {s: sum(o.state == s for o in outcomes) for s in ("absent", "refused", "complete")}
    wrong = sum(o.identical is False for o in outcomes)
    line = (
        f"{w.name}: {n} kill points over its writes at {first:.1f}-{last:.1f} s: absent {counts['absent']}, refused {counts['refused']}, "
        f"complete {counts['complete']} ({wrong} differing from the uninterrupted run); data lost {sum(o.lost for o in outcomes)}; "
        f"reruns ok {sum(o.rerun_ok and o.rerun_identical for o in outcomes)}/{n}"
    )
    return outcomes, line


def assert_safe(w: Writer, outcomes: list[Outcome], logs: Path) -> None:
    for i, o in enumerate(outcomes):
        where = f"{w.name} killed at {o.point_s} s (log {logs / f'{w.name}-kill{i}.log'})"
        assert o.identical is not False, f"{where}: output looks complete but differs from an uninterrupted run"
        assert o.lost == 0, f"{where}: earlier good data was lost"
        assert o.rerun_ok, f"{where}: the same command run again failed"
        assert o.rerun_identical, f"{where}: the rerun's output differs from an uninterrupted run"
