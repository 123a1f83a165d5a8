"""The toolkit's episode layout: `EPISODES/<task>/episode<k>/<i>.jpg` plus `episode.json`.

Frames are numbered 0..N-1 and must be contiguous: pairs are built by index (frame i and
frame i + horizon), so a gap would silently change the time offset of every later pair.
A broken episode is skipped with a warning naming its dir, never the whole scan.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from lftk.errors import LftkError

log = logging.getLogger(__name__)

EPISODE_META = "episode.json"
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
_FRAME_NAME = re.compile(r"^(\d+)\.(jpe?g|png)$", re.IGNORECASE)
_EPISODE_NAME = re.compile(r"^episode(\d+)$")


@dataclass(frozen=True)
class Episode:
    task: str  # the task dir name (authoritative: it keeps sample names unique)
    name: str  # "episode<k>"
    path: Path
    instruction: str
    frame_paths: tuple[Path, ...]  # index i holds frame i
    meta: dict = field(default_factory=dict, compare=False, repr=False)  # episode.json as read

    @property
    def n_frames(self) -> int:
        return len(self.frame_paths)

    @property
    def key(self) -> str:
        """`task/episode<k>`: how reports and pairs.json name this episode."""
        return f"{self.task}/{self.name}"


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


@dataclass
class EpisodeScan:
    root: Path
    episodes: list[Episode]
    skipped: list[Skipped]


def _episode_order(path: Path) -> tuple[int, str]:
    m = _EPISODE_NAME.match(path.name)
    # Numeric order: episode10 after episode9; odd names go last, alphabetically.
    return (int(m.group(1)), "") if m else (1 << 62, path.name)


def _candidate_dirs(root: Path) -> list[Path]:
    """Dirs at `root/<task>/<episode>` that look like episodes (named episode<k> or holding episode.json)."""
    found = []
    for task_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        eps = [
            p
            for p in task_dir.iterdir()
            # Hidden dirs (e.g. the simulator's `.episode<k>.partial`) are unfinished writes: never read them.
            if p.is_dir() and not p.name.startswith(".")
            and (_EPISODE_NAME.match(p.name) or (p / EPISODE_META).is_file())
        ]
        found.extend(sorted(eps, key=_episode_order))
    return found


def _frame_paths(ep_dir: Path) -> tuple[Path, ...]:
    """Frames sorted by their number; raises ValueError on a gap or a duplicate index."""
    numbered: dict[int, Path] = {}
    for p in ep_dir.iterdir():
        m = _FRAME_NAME.match(p.name)
        if not m or not p.is_file():
            continue
        i = int(m.group(1))
        if i in numbered:
            raise ValueError(f"frame {i} appears twice ({numbered[i].name}, {p.name})")
        numbered[i] = p
    if not numbered:
        raise ValueError("no frames (<i>.jpg or <i>.png)")
    missing = sorted(set(range(max(numbered) + 1)) - set(numbered))
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"frames are not numbered 0..{max(numbered)}: missing {shown}")
    return tuple(numbered[i] for i in range(len(numbered)))


def _read_meta(ep_dir: Path) -> dict:
    path = ep_dir / EPISODE_META
    if not path.is_file():
        raise ValueError(f"no {EPISODE_META}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{EPISODE_META} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{EPISODE_META} is not a JSON object")
    instruction = meta.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"{EPISODE_META} has no non-empty 'instruction'")
    return meta


def read_episode(ep_dir: Path) -> Episode:
    """One episode dir; ValueError with the reason when it is unusable."""
    ep_dir = Path(ep_dir)
    meta = _read_meta(ep_dir)
    frames = _frame_paths(ep_dir)
    task = ep_dir.parent.name
    if meta.get("task") not in (None, task):
        log.warning("%s: episode.json says task %r but the dir is under %r; using %r", ep_dir, meta["task"], task, task)
    declared = meta.get("frames")
    if isinstance(declared, int) and declared != len(frames):
        log.warning("%s: episode.json says %d frames, %d found; using the files", ep_dir, declared, len(frames))
    return Episode(task, ep_dir.name, ep_dir, meta["instruction"].strip(), frames, meta)


def scan_episodes(root: Path | str) -> EpisodeScan:
    """Every episode under `root`, plus the dirs skipped and why. LftkError when nothing usable is there."""
    root = Path(root)
    if not root.is_dir():
        raise LftkError(f"{root}: episodes dir not found")
    if (root / "pairs.json").is_file():
        raise LftkError(f"{root}: this is a pair dir (has pairs.json), not an episodes dir")
    candidates = _candidate_dirs(root)
    if not candidates:
        raise LftkError(f"{root}: no episodes found (expected {root}/<task>/episode<k>/<i>.jpg + {EPISODE_META})")
    episodes, skipped = [], []
    for ep_dir in candidates:
        try:
            episodes.append(read_episode(ep_dir))
        except ValueError as exc:
            log.warning("%s: skipped: %s", ep_dir, exc)
            skipped.append(Skipped(ep_dir, str(exc)))
    if not episodes:
        raise LftkError(f"{root}: none of {len(candidates)} episode dirs is usable (see the warnings above)")
    if skipped:
        log.warning("%s: %d episode(s) read, %d skipped", root, len(episodes), len(skipped))
    return EpisodeScan(root, episodes, skipped)


def list_episodes(root: Path) -> list[Episode]:
    """Episodes under `root`, sorted by task then episode number; broken ones skipped with a warning."""
    return scan_episodes(root).episodes
