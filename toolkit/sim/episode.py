"""One episode: build the world, play the task's script, render every frame, write the episode dir.

Everything here is a function of (task, derived seed, frames, resolution): the physics is reset,
the RNG is seeded, the wall clock is never read, so the same inputs give the same bytes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from lftk.data.images import save_rgb
from lftk.sim import scene as world
from lftk.sim.camera import HeadCamera
from lftk.sim.motion import play
from lftk.sim.scripts import SCRIPTS
from lftk.sim.skills import Record
from lftk.sim.tasks import TASKS

log = logging.getLogger(__name__)

FPS = world.PHYSICS_HZ // world.SUBSTEPS  # 10
SOURCE = "lftk-sim"
DIGITS = 5  # states are rounded: 10 um and 1e-5 in a quaternion are far below a pixel


def _state(scene: world.Scene) -> dict:
    objects = {}
    for name in scene.objects:
        pos, orn = scene.pose(name)
        objects[name] = [round(float(v), DIGITS) for v in (*pos, *orn)]
    ee = {name: [round(float(v), DIGITS) for v in arm.ee_pos()] for name, arm in scene.arms.items()}
    return {"ee": ee, "objects": objects}


def run_episode(urdf: str, task: str, episode: int, seed: int, frames: int, resolution: int, out: Path) -> dict:
    """Simulate into `out` (which must exist and be empty); return the episode.json dict."""
    rng = np.random.default_rng(seed)
    camera = HeadCamera(resolution)
    scene = world.build(urdf, camera)
    rec = Record()
    phases, success = SCRIPTS[task](scene, rng, rec)
    states: list[dict] = []

    def on_frame(i: int) -> None:
        save_rgb(camera.render(scene.backdrop), out / f"{i}.jpg")
        states.append(_state(scene))

    play(scene, phases, frames, rng, on_frame)
    meta = {
        "task": task,
        "instruction": TASKS[task].instruction,
        "seed": seed,
        "episode": episode,
        "fps": FPS,
        "frames": frames,
        "resolution": resolution,
        "source": SOURCE,
        "camera": camera.to_dict(),
        "objects": {name: {"color": [round(c, 3) for c in scene.colors[name]]} for name in scene.objects},
        "success": bool(success()),
        "events": rec.events,
        "states": states,
    }
    (out / "episode.json").write_text(json.dumps(meta, separators=(",", ":")) + "\n")
    log.debug("%s episode%d (seed %d): %s", task, episode, seed, "; ".join(rec.events))
    return meta
