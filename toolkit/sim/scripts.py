"""The paper's three tasks, scripted: object layout drawn from the episode's RNG, then phases.

Each script adds its objects to the scene and returns the phases plus a success test that reads
the `Record` (grasps that really held, contacts seen) and the final poses: never the plan.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pybullet as p

from lftk.sim import scene as world
from lftk.sim.motion import Phase, Target, Targets
from lftk.sim.scene import Scene
from lftk.sim.skills import Record, carry_to, grasp_point, pick, release, retreat, rests_on

BLOCK = 0.025  # cube half side
BLOCK_COLORS = ("red", "green", "yellow")

Script = Callable[[Scene, np.random.Generator, Record], tuple[list[Phase], Callable[[], bool]]]


def _side_arm(sign: float) -> str:
    return "left" if sign < 0 else "right"


def _rest(arm: str, rng: np.random.Generator) -> tuple[float, float, float]:
    """Where an arm goes when done: near its start pose but not on it, so the last frame never
    repeats the first."""
    x, y, z = world.start_pos(arm)
    out = 1.0 if x > 0 else -1.0
    return (x + out * rng.uniform(-0.04, 0.06), y + rng.uniform(-0.02, 0.1), z + rng.uniform(-0.06, 0.08))


# --------------------------------------------------------------------------- block_hammer_beat


def hammer_beat(scene: Scene, rng: np.random.Generator, rec: Record):
    sign = float(rng.choice([-1.0, 1.0]))
    arm = _side_arm(sign)
    hammer_xy = [sign * rng.uniform(0.2, 0.28), rng.uniform(0.3, 0.38)]
    hammer_yaw = math.pi / 2 + rng.uniform(-0.35, 0.35)  # head pointing away from the arms
    head = np.array(hammer_xy) + world.HEAD_X * np.array([math.cos(hammer_yaw), math.sin(hammer_yaw)])
    while True:  # block ahead of the hammer, clear of its head
        block_xy = np.array([sign * rng.uniform(0.06, 0.2), rng.uniform(0.5, 0.58)])
        if np.linalg.norm(block_xy - head) > 0.1:
            break
    world.add_hammer(scene, "hammer", hammer_xy, hammer_yaw)
    color = str(rng.choice(BLOCK_COLORS))
    world.add_box(scene, "block", [BLOCK] * 3, list(block_xy), rng.uniform(0, math.pi / 2), color)
    plan: dict[str, np.ndarray] = {}

    def over_block(clearance: float, tilt: float) -> Callable[[Scene, Targets], Targets]:
        def targets(sc: Scene, cur: Targets) -> Targets:
            if "impact" not in plan:  # first call: hammer held level, so the offset is rigid
                block = np.asarray(sc.pose("block")[0])
                ee = np.asarray(sc.arms[arm].ee_pos())
                goal_head = block + [0, 0, BLOCK + world.HEAD[2]]  # head bottom on the block top
                plan["impact"] = goal_head + (ee - grasp_point(sc, "hammer", world.HEAD_X))
            hand = plan["impact"] + [0, 0, clearance]
            return {arm: Target(tuple(float(v) for v in hand), cur[arm].yaw, cur[arm].grip, tilt)}

        return targets

    hits: set[int] = set()  # strikes in which the hammer touched the block

    def watch(strike: int) -> Callable[[Scene], None]:
        def look(sc: Scene) -> None:
            if strike not in hits and p.getContactPoints(sc.objects["hammer"], sc.objects["block"]):
                hits.add(strike)
                rec.events.append(f"{arm} hit the block (strike {strike + 1})")

        return look

    beats = []
    for k in range(int(rng.integers(2, 4))):
        beats += [
            Phase(0.9, over_block(0.1, -0.4), name="raise hammer"),  # head tilted up, then down
            Phase(0.5, over_block(-0.006, 0.0), name="strike", watch=watch(k)),  # aim 6 mm in
        ]
    phases = [
        *pick(rec, arm, "hammer", along=-0.035, grasp_z=0.016, lift=0.16),
        Phase(2.2, over_block(0.1, 0.0), name="hammer over block"),
        *beats,
        Phase(1.0, over_block(0.12, 0.0), name="lift hammer"),
        # Put it down beside the block, nearer the arm: a new place, clear of the block.
        carry_to(arm, "hammer", [*(block_xy + [sign * 0.13, -0.12]), world.HEAD[2] + 0.01], seconds=2.2),
        *release(rec, arm, "hammer"),
        retreat(arm, _rest(arm, rng)),
    ]
    return phases, lambda: rec.grasped(arm, "hammer") and bool(hits)


# ------------------------------------------------------------------------------ block_handover


def handover(scene: Scene, rng: np.random.Generator, rec: Record):
    sign = float(rng.choice([-1.0, 1.0]))
    giver, taker = _side_arm(sign), _side_arm(-sign)
    half = [0.1, 0.0175, 0.0175]
    bar_xy = [sign * rng.uniform(0.16, 0.24), rng.uniform(0.38, 0.5)]
    pad_xy = [-sign * rng.uniform(0.16, 0.24), rng.uniform(0.4, 0.55)]
    world.add_box(scene, "bar", half, bar_xy, rng.uniform(-0.3, 0.3), str(rng.choice(BLOCK_COLORS)), mass=0.08)
    pad_half = 0.065  # the bar is 20 cm long: a roomier pad than for blocks
    world.add_pad(scene, "pad", pad_xy, half=pad_half)
    meet = [rng.uniform(-0.03, 0.03), rng.uniform(0.4, 0.48), rng.uniform(0.24, 0.3)]
    # Two top-down grasps 12 cm apart on the 20 cm bar: the hands' thin sides face each other.
    give_along, take_along = sign * 0.06, -sign * 0.06
    take = pick(rec, taker, "bar", along=take_along, hover=0.1)[:3]  # approach, descend, close
    rest_z = world.PAD_TOP + half[2]
    phases = [
        *pick(rec, giver, "bar", along=give_along, lift=0.2),
        carry_to(giver, "bar", meet, seconds=2.5),
        *take,
        *release(rec, giver, "bar"),
        Phase(1.2, lambda sc, cur: {taker: cur[taker].moved(dz=0.06)}, name=f"{taker} lift"),
        carry_to(taker, "bar", [*pad_xy, rest_z + 0.08]),
        retreat(giver, _rest(giver, rng), seconds=1.0),
        carry_to(taker, "bar", [*pad_xy, rest_z + 0.004], seconds=1.2),
        *release(rec, taker, "bar"),
        retreat(taker, _rest(taker, rng)),
    ]

    def success() -> bool:
        held = rec.grasped(giver, "bar") and rec.grasped(taker, "bar")
        return held and rests_on(scene, "bar", pad_xy, pad_half, rest_z)

    return phases, success


# --------------------------------------------------------------------------- blocks_stack_easy


def stack(scene: Scene, rng: np.random.Generator, rec: Record):
    pad_xy = np.array([rng.uniform(-0.08, 0.08), rng.uniform(0.4, 0.5)])
    spots = [pad_xy]
    while len(spots) < 3:  # two blocks, apart from each other and from the pad
        xy = np.array([rng.uniform(-0.26, 0.26), rng.uniform(0.34, 0.58)])
        if all(np.linalg.norm(xy - s) > 0.13 for s in spots):
            spots.append(xy)
    colors = rng.permutation(BLOCK_COLORS)[:2]
    names = ["block_bottom", "block_top"]
    for name, xy, color in zip(names, spots[1:], colors):
        world.add_box(scene, name, [BLOCK] * 3, list(xy), rng.uniform(0, math.pi / 2), str(color))
    world.add_pad(scene, "pad", list(pad_xy))

    rest_z = world.PAD_TOP + BLOCK
    goals = {
        "block_bottom": lambda sc: np.array([*pad_xy, rest_z]),
        "block_top": lambda sc: np.asarray(sc.pose("block_bottom")[0]) + [0, 0, 2 * BLOCK],
    }
    arms = {name: _side_arm(xy[0]) for name, xy in zip(names, spots[1:])}  # the nearer arm
    phases: list[Phase] = []
    for name, goal in goals.items():
        arm = arms[name]
        phases += [
            *pick(rec, arm, name, period=math.pi / 2, grasp_z=BLOCK + 0.006),
            carry_to(arm, name, lambda sc, g=goal: g(sc) + [0, 0, 0.06]),
            carry_to(arm, name, lambda sc, g=goal: g(sc) + [0, 0, 0.004], seconds=1.2),  # 4 mm drop
            *release(rec, arm, name),
            retreat(arm, _rest(arm, rng)),
        ]

    def success() -> bool:
        if not all(rec.grasped(arm, name) for name, arm in arms.items()):
            return False
        bottom = scene.pose("block_bottom")[0]
        return rests_on(scene, "block_bottom", pad_xy, world.PAD_HALF, rest_z) and rests_on(
            scene, "block_top", bottom[:2], 0.02, bottom[2] + 2 * BLOCK
        )

    return phases, success


SCRIPTS: dict[str, Script] = {
    "block_hammer_beat": hammer_beat,
    "block_handover": handover,
    "blocks_stack_easy": stack,
}
