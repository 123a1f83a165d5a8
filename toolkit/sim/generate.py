"""`lftk data sim`: episodes of the scripted tasks, in parallel worker processes, written atomically.

Layout: OUT/<task>/episode<k>/<i>.jpg (i = 0..frames-1) and episode.json. Each episode is written
into OUT/<task>/.episode<k>.partial and renamed into place when complete, so a killed run never
leaves a half-written episode behind (a leftover .partial is cleared by the next run).

Running the same command again resumes: episodes already in OUT that were made with the same
seed, frames and resolution are kept, the missing ones are simulated (each episode is seeded on its
own, so the result equals one uninterrupted run). An episode made with other settings is refused.
"""

from __future__ import annotations

import difflib
import json
import logging
import multiprocessing as mp
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from lftk.errors import LftkError, NotAvailableError
from lftk.sim.tasks import TASKS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    task: str
    episode: int
    seed: int  # derived: the only randomness the episode sees
    frames: int
    resolution: int
    out: str  # OUT root
    urdf: str

    @property
    def dest(self) -> Path:
        return Path(self.out) / self.task / f"episode{self.episode}"

    @property
    def partial(self) -> Path:
        return Path(self.out) / self.task / f".episode{self.episode}.partial"


def episode_seed(seed: int, task: str, episode: int) -> int:
    """A 32-bit seed from (run seed, task, episode index); stable across Python versions and
    processes (crc32, not hash(), which is salted per process)."""
    state = np.random.SeedSequence([seed, zlib.crc32(task.encode()), episode]).generate_state(1)
    return int(state[0])


def resolve_tasks(tasks: list[str] | None) -> list[str]:
    if tasks is None:
        return list(TASKS)
    if not tasks:
        raise LftkError(f"no task given; valid tasks: {', '.join(TASKS)}")
    for name in tasks:
        if name not in TASKS:
            near = difflib.get_close_matches(name, list(TASKS), n=1, cutoff=0.5)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise LftkError(f"unknown task {name!r}{hint}; valid tasks: {', '.join(TASKS)}")
    return list(dict.fromkeys(tasks))  # keep order, drop repeats


def _check_numbers(episodes: int, frames: int, resolution: int, seed: int, workers: int) -> None:
    problems = []
    if episodes < 1:
        problems.append(f"episodes must be >= 1 (got {episodes})")
    if frames < 2:
        problems.append(f"frames must be >= 2 (got {frames})")
    if resolution < 16:
        problems.append(f"resolution must be >= 16 (got {resolution})")
    if seed < 0:
        problems.append(f"seed must be >= 0 (got {seed})")
    if workers < 1:
        problems.append(f"workers must be >= 1 (got {workers})")
    if problems:
        raise LftkError("; ".join(problems))


# ------------------------------------------------------------------------------------ workers


def _connect() -> None:
    """One DIRECT (no GUI) pybullet client per process, made here and never before a fork."""
    import pybullet as p

    p.connect(p.DIRECT)


def _work(job: Job) -> dict:
    from lftk.sim.episode import run_episode

    if job.partial.exists():
        shutil.rmtree(job.partial)
    job.partial.mkdir(parents=True)
    meta = run_episode(job.urdf, job.task, job.episode, job.seed, job.frames, job.resolution, job.partial)
    job.partial.rename(job.dest)
    return {"task": job.task, "episode": job.episode, "success": meta["success"], "frames": job.frames}


def _run_inline(jobs: list[Job], done: Callable[[dict], None]) -> None:
    import pybullet as p

    _connect()
    try:
        for job in jobs:
            done(_work(job))
    finally:
        p.disconnect()


def _run_pool(jobs: list[Job], workers: int, done: Callable[[dict], None]) -> None:
    # fork when the caller holds no pybullet client (workers connect after the fork, never share
    # one): it starts fast and, unlike spawn, does not re-run a caller's unguarded script.
    method = "fork" if "fork" in mp.get_all_start_methods() and not _caller_has_client() else "spawn"
    ctx = mp.get_context(method)
    with ctx.Pool(workers, initializer=_connect) as pool:
        for result in pool.imap_unordered(_work, jobs, chunksize=1):
            done(result)


# ----------------------------------------------------------------------------------------- API


def simulate(
    out: Path,
    tasks: list[str] | None = None,
    episodes: int = 2,
    frames: int = 300,
    resolution: int = 128,
    seed: int = 0,
    workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Simulate `episodes` episodes of each task into `out`; return a summary
    {"episodes", "frames", "tasks": {name: {"instruction", "episodes", "successes"}}, "seconds"}."""
    names = resolve_tasks(tasks)
    _check_numbers(episodes, frames, resolution, seed, workers)
    try:
        import pybullet  # noqa: F401
    except ImportError:
        raise NotAvailableError("the simulator needs pybullet: pip install 'lftk[sim]'") from None
    from lftk.sim.meshes import light_panda_urdf

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LftkError(f"{out}: exists and is not a directory")
    urdf = str(light_panda_urdf())  # decimate once here, not racing in every worker
    wanted = [Job(t, k, episode_seed(seed, t, k), frames, resolution, str(out), urdf) for t in names for k in range(episodes)]
    done_before = {j: meta for j in wanted if (meta := _finished_meta(j)) is not None}
    jobs = [j for j in wanted if j not in done_before]
    if len(jobs) < len(wanted):
        log.info("%s: %d of %d episodes already there (same seed, frames, resolution): simulating the other %d",
                 out, len(wanted) - len(jobs), len(wanted), len(jobs))
    for t in names:
        (out / t).mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    results: list[dict] = []

    def done(result: dict) -> None:
        results.append(result)
        outcome = "success" if result["success"] else "failed"
        log.info("%s episode%d: %s", result["task"], result["episode"], outcome)
        if progress is not None:
            progress(len(results), len(jobs))

    workers = max(1, min(workers, len(jobs)))
    log.info("simulating %d episodes x %d frames at %d px with %d worker(s) -> %s",
             len(jobs), frames, resolution, workers, out)
    if jobs and workers == 1 and not _caller_has_client():
        _run_inline(jobs, done)
    elif jobs:
        _run_pool(jobs, workers, done)
    results += [{"task": j.task, "episode": j.episode, "success": bool(m.get("success")), "frames": j.frames}
                for j, m in done_before.items()]

    summary_tasks = {
        t: {
            "instruction": TASKS[t].instruction,
            "episodes": sum(r["task"] == t for r in results),
            "successes": sum(r["success"] for r in results if r["task"] == t),
        }
        for t in names
    }
    return {
        "episodes": len(results),
        "frames": sum(r["frames"] for r in results),
        "tasks": summary_tasks,
        "seconds": round(time.perf_counter() - start, 2),
    }


def _finished_meta(job: Job) -> dict | None:
    """episode.json of a complete episode of this job's settings, None when there is none; LftkError
    for one made with other settings."""
    if not job.dest.exists():
        return None
    meta_path = job.dest / "episode.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        raise LftkError(f"{job.dest}: exists without a readable episode.json (not made by lftk data sim?); "
                        "remove it or choose a new OUT") from None
    made = {k: meta.get(k) for k in ("seed", "frames", "resolution")}
    want = {"seed": job.seed, "frames": job.frames, "resolution": job.resolution}
    if made != want:
        diff = ", ".join(f"{k} {made[k]} (now {want[k]})" for k in want if made[k] != want[k])
        raise LftkError(f"{job.dest} was made with other settings: {diff}; choose a new OUT or the same options")
    missing = [i for i in range(job.frames) if not (job.dest / f"{i}.jpg").is_file()]
    if missing:
        raise LftkError(f"{job.dest}: frame {missing[0]}.jpg is missing ({len(missing)} of {job.frames}); remove the episode "
                        "and run again to re-simulate it")
    return meta


def _caller_has_client() -> bool:
    """Our calls use pybullet's default client; if the caller already holds one, stay out of it."""
    import pybullet as p

    return bool(p.isConnected())
