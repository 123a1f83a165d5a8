"""Reusable phase sequences: top-down pick, carry, place, retreat. Targets that depend on where an
object really is are computed when their phase starts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pybullet as p

from lftk.sim.motion import Phase, Target, Targets
from lftk.sim.robot import NATURAL_YAW
from lftk.sim.scene import Scene

HOVER = 0.12  # approach height above the grasp point
LIFT = 0.18


@dataclass
class Record:
    """What really happened: grasps that held, contacts seen. Success is computed from this."""

    grasps: dict[str, bool] = field(default_factory=dict)  # "arm:object" -> attached
    events: list[str] = field(default_factory=list)

    def grasped(self, arm: str, obj: str) -> bool:
        return self.grasps.get(f"{arm}:{obj}", False)


def yaw_of(orn) -> float:
    return p.getEulerFromQuaternion(orn)[2]


def hand_yaw(axis_yaw: float, period: float = math.pi) -> float:
    """Hand yaw that lines the hand's x axis up with an object axis (fingers close across it),
    picked among the object's symmetric equivalents nearest the arm's natural yaw, so the wrist
    never winds towards its limits."""
    k = round((NATURAL_YAW - axis_yaw) / period)
    return axis_yaw + k * period


def grasp_point(scene: Scene, obj: str, along: float = 0.0) -> np.ndarray:
    """World point `along` metres on the object's local x axis from its origin."""
    pos, orn = scene.pose(obj)
    return np.array(p.multiplyTransforms(pos, orn, [along, 0, 0], [0, 0, 0, 1])[0])


def pick(rec: Record, arm: str, obj: str, along: float = 0.0, period: float = math.pi,
         grasp_z: float | None = None, hover: float = HOVER, lift: float = LIFT) -> list[Phase]:
    """Approach above the object, descend, close, attach if really between the fingers, lift.
    `along`: grasp point on the object's x axis; `period`: the object's yaw symmetry."""
    plan: dict[str, Target] = {}

    def approach(sc: Scene, cur: Targets) -> Targets:
        point = grasp_point(sc, obj, along)
        _, orn = sc.pose(obj)
        z = point[2] if grasp_z is None else grasp_z
        plan["grasp"] = Target((float(point[0]), float(point[1]), float(z)), hand_yaw(yaw_of(orn), period))
        return {arm: plan["grasp"].moved(dz=hover)}

    def close_and_check(sc: Scene) -> None:
        ok = sc.arms[arm].between_fingers(sc.objects[obj])
        if ok:
            sc.arms[arm].attach(sc.objects[obj])
        rec.grasps[f"{arm}:{obj}"] = ok
        rec.events.append(f"{arm} {'grasped' if ok else 'missed'} {obj}")

    return [
        Phase(2.0, approach, name=f"{arm} approach {obj}"),
        Phase(1.2, lambda sc, cur: {arm: plan["grasp"]}, name=f"{arm} descend"),
        Phase(0.7, lambda sc, cur: {arm: plan["grasp"].moved(grip=0.0)}, close_and_check, name=f"{arm} close"),
        Phase(1.2, lambda sc, cur: {arm: cur[arm].moved(dz=lift)}, name=f"{arm} lift"),
    ]


def carry_to(arm: str, obj: str, goal_xyz, seconds: float = 2.5) -> Phase:
    """Move the hand so the held object's origin lands on `goal_xyz` (or a callable giving it),
    keeping the hand's yaw: the offset hand->object measured now stays rigid. After a missed
    grasp the empty hand goes through the same motion, to the goal itself."""

    def targets(sc: Scene, cur: Targets) -> Targets:
        goal = np.asarray(goal_xyz(sc) if callable(goal_xyz) else goal_xyz, dtype=float)
        hand = goal
        if sc.arms[arm].held == sc.objects[obj]:
            hand = goal + (np.asarray(sc.arms[arm].ee_pos()) - np.asarray(sc.pose(obj)[0]))
        return {arm: Target(tuple(float(v) for v in hand), cur[arm].yaw, cur[arm].grip, cur[arm].tilt)}

    return Phase(seconds, targets, name=f"{arm} carry {obj}")


def release(rec: Record, arm: str, obj: str) -> list[Phase]:
    def let_go(sc: Scene) -> None:
        if sc.arms[arm].held == sc.objects[obj]:
            rec.events.append(f"{arm} released {obj}")
        sc.arms[arm].release()

    return [
        Phase(0.3, {}, let_go, name=f"{arm} let go"),
        Phase(0.6, lambda sc, cur: {arm: cur[arm].moved(grip=1.0)}, name=f"{arm} open"),
        Phase(1.0, lambda sc, cur: {arm: cur[arm].moved(dz=HOVER)}, name=f"{arm} back off"),
    ]


def retreat(arm: str, xyz: tuple[float, float, float], seconds: float = 1.8) -> Phase:
    return Phase(seconds, lambda sc, cur: {arm: Target(xyz, NATURAL_YAW, 1.0)}, name=f"{arm} retreat")


def rests_on(scene: Scene, obj: str, xy, half: float, z: float, tol: float = 0.012) -> bool:
    """Object's origin within `half` of `xy` horizontally and within `tol` of height `z`."""
    pos, orn = scene.pose(obj)
    up = np.array(p.getMatrixFromQuaternion(orn)).reshape(3, 3)[:, 2]
    flat = abs(abs(up[2]) - 1.0) < 0.05 or abs(up[2]) < 0.05  # a box resting on any face
    return bool(max(abs(pos[0] - xy[0]), abs(pos[1] - xy[1])) < half and abs(pos[2] - z) < tol and flat)
