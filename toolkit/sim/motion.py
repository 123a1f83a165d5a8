"""Scripted motion: phases of end-effector targets, stretched to fill an episode, played through IK.

A task is a list of phases. Each has a nominal length and per-arm targets, given directly or as a
function of the world at the moment the phase starts (so a placement can use where the object
really sits in the hand). Phase lengths are jittered per episode and scaled so the motion ends on
the last frame: with a 100-frame horizon, a sample never compares two idle frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from lftk.sim.robot import NATURAL_YAW, top_down
from lftk.sim.scene import SUBSTEPS, Scene

IK_EVERY = 4  # substeps between IK solves: 60 Hz at 240 Hz physics


@dataclass(frozen=True)
class Target:
    pos: tuple[float, float, float]
    yaw: float
    grip: float = 1.0  # 1 open, 0 closed
    tilt: float = 0.0  # hand pitch about its finger axis, radians (the hammer swing)

    def moved(self, dx: float = 0.0, dy: float = 0.0, dz: float = 0.0, **changes) -> "Target":
        x, y, z = self.pos
        return replace(self, pos=(x + dx, y + dy, z + dz), **changes)


Targets = dict[str, Target]


@dataclass
class Phase:
    seconds: float  # nominal length before jitter and stretching
    targets: Targets | Callable[[Scene, Targets], Targets]
    on_end: Callable[[Scene], None] | None = None
    name: str = ""
    watch: Callable[[Scene], None] | None = None  # called after every physics step of the phase


def allocate(phases: list[Phase], total: int, rng: np.random.Generator, jitter: float = 0.3) -> list[int]:
    """Substeps per phase: nominal lengths times U(1-jitter, 1+jitter), scaled to sum to `total`
    (largest remainder). Very short episodes give some phases no time: they are skipped."""
    weights = np.array([ph.seconds for ph in phases]) * rng.uniform(1 - jitter, 1 + jitter, len(phases))
    exact = weights / weights.sum() * total
    counts = np.floor(exact).astype(int)
    short = total - counts.sum()
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:short]] += 1
    return [int(c) for c in counts]


def _ease(s: float) -> float:
    return s * s * (3.0 - 2.0 * s)  # zero velocity at both ends of a phase


def _blend(a: Target, b: Target, s: float) -> Target:
    pos = tuple(float(x) for x in np.asarray(a.pos) + (np.asarray(b.pos) - np.asarray(a.pos)) * s)
    dyaw = math.atan2(math.sin(b.yaw - a.yaw), math.cos(b.yaw - a.yaw))  # shortest way round
    return Target(pos, a.yaw + dyaw * s, a.grip + (b.grip - a.grip) * s, a.tilt + (b.tilt - a.tilt) * s)


def start_targets(scene: Scene) -> Targets:
    out = {}
    for name, arm in scene.arms.items():
        pos, _ = arm.ee_pose()
        out[name] = Target(tuple(pos), NATURAL_YAW)
    return out


def play(scene: Scene, phases: list[Phase], frames: int, rng: np.random.Generator,
         on_frame: Callable[[int], None]) -> None:
    """Run the phases over frames-1 frame intervals; `on_frame(i)` after frame i's physics."""
    total = (frames - 1) * SUBSTEPS
    counts = allocate(phases, total, rng)
    current = start_targets(scene)
    commanded: dict[str, Target] = {}  # an arm whose target stands still keeps its IK solution
    on_frame(0)
    step = 0
    for phase, count in zip(phases, counts):
        begin = dict(current)
        goal = phase.targets(scene, current) if callable(phase.targets) else phase.targets
        goal = {**current, **goal}
        for k in range(count):
            if step % IK_EVERY == 0 or k == 0:
                s = _ease((k + 1) / count)
                for name, arm in scene.arms.items():
                    t = _blend(begin[name], goal[name], s)
                    if commanded.get(name) != t:
                        arm.command(arm.ik(list(t.pos), top_down(t.yaw, t.tilt)), t.grip)
                        commanded[name] = t
            scene.step()
            step += 1
            if phase.watch is not None:
                phase.watch(scene)  # contacts can be brief: look at every step, not every frame
            if step % SUBSTEPS == 0:
                on_frame(step // SUBSTEPS)
        current = goal
        if phase.on_end is not None:
            phase.on_end(scene)
