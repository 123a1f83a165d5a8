"""The world: a table, two Pandas at its near edge, coloured objects, a blue target pad.

World frame: z up, the table top at z = 0, the arms' bases on the near edge (y = 0) at
x = -/+ ARM_X, both facing +y, the workspace in between and in front of them. The head camera
(camera.py) sits behind and above the bases, so the arms rise from the bottom of the view.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pybullet as p

from lftk.sim.camera import HeadCamera
from lftk.sim.robot import Arm

SUBSTEPS = 24  # physics steps per frame: 240 Hz physics, 10 frames per simulated second
PHYSICS_HZ = 240
ARM_X = 0.42  # bases far enough apart that the elbows frame the workspace instead of hiding it
START = (0.34, 0.26, 0.3)  # right arm's hand at the start (the left one mirrored)
# Wider and deeper than the arms need: from the head camera it fills the frame.
TABLE = {"half": [0.9, 0.75, 0.03], "center": [0.0, 0.45, -0.03], "color": [0.62, 0.52, 0.42]}
FLOOR_Z = -0.75
FLOOR_COLOR = [0.42, 0.42, 0.45]

COLORS = {
    "red": [0.85, 0.15, 0.12],
    "green": [0.15, 0.65, 0.2],
    "yellow": [0.95, 0.8, 0.1],
    "blue": [0.1, 0.3, 0.9],
    "wood": [0.55, 0.35, 0.18],
    "steel": [0.35, 0.37, 0.4],
}


@dataclass
class Scene:
    arms: dict[str, Arm]
    objects: dict[str, int] = field(default_factory=dict)  # name -> body id, tracked per frame
    colors: dict[str, list[float]] = field(default_factory=dict)
    backdrop: np.ndarray | None = None  # (H, W, 3) frame of the empty table

    def pose(self, name: str) -> tuple[list[float], list[float]]:
        pos, orn = p.getBasePositionAndOrientation(self.objects[name])
        return list(pos), list(orn)

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            p.stepSimulation()


def reset_world() -> None:
    """A fresh, deterministic physics world (called before every episode)."""
    p.resetSimulation()
    p.setPhysicsEngineParameter(
        fixedTimeStep=1.0 / PHYSICS_HZ, numSolverIterations=50, deterministicOverlappingPairs=1,
    )
    p.setGravity(0, 0, -9.81)


def _static_box(half: list[float], center: list[float], color: list[float], collide: bool = True) -> int:
    vis = p.createVisualShape(p.GEOM_BOX, halfExtents=half, rgbaColor=[*color, 1])
    col = p.createCollisionShape(p.GEOM_BOX, halfExtents=half) if collide else -1
    return p.createMultiBody(0, col, vis, center)


def build(urdf: str, camera: HeadCamera) -> Scene:
    """Table and both arms; tasks add their objects with `add_box` / `add_hammer`.

    The static backdrop (floor, table) is rendered once here and then dropped from the render
    list: large triangles cost TinyRenderer as much as an arm, and nothing ever passes behind
    the table top. The camera pastes it where a frame shows no body."""
    reset_world()
    scenery = [
        _static_box([3.0, 3.0, 0.01], [0, 0, FLOOR_Z - 0.01], FLOOR_COLOR, collide=False),
        _static_box(TABLE["half"], TABLE["center"], TABLE["color"], collide=False),
    ]
    backdrop = camera.render()
    for body in scenery:
        p.removeBody(body)
    # A body without a visual shape is drawn from its collision shape, so the table keeps a
    # speck of a visual far behind the camera.
    speck = p.createVisualShape(p.GEOM_BOX, halfExtents=[0.001] * 3, visualFramePosition=[0, -5, 0])
    solid = p.createCollisionShape(p.GEOM_BOX, halfExtents=TABLE["half"])
    table = p.createMultiBody(0, solid, speck, TABLE["center"])
    p.changeDynamics(table, -1, lateralFriction=0.8)
    arms = {
        "left": Arm.load(urdf, "left", [-ARM_X, 0.0, 0.0], -1.0, start_pos("left")),
        "right": Arm.load(urdf, "right", [ARM_X, 0.0, 0.0], 1.0, start_pos("right")),
    }
    return Scene(arms=arms, backdrop=backdrop)


def start_pos(arm: str) -> list[float]:
    x, y, z = START
    return [-x if arm == "left" else x, y, z]


def add_box(scene: Scene, name: str, half: list[float], xy: list[float], yaw: float, color: str,
            mass: float = 0.05) -> int:
    vis = p.createVisualShape(p.GEOM_BOX, halfExtents=half, rgbaColor=[*COLORS[color], 1])
    col = p.createCollisionShape(p.GEOM_BOX, halfExtents=half)
    body = p.createMultiBody(mass, col, vis, [xy[0], xy[1], half[2]], p.getQuaternionFromEuler([0, 0, yaw]))
    p.changeDynamics(body, -1, lateralFriction=1.0, spinningFriction=0.001)
    scene.objects[name] = body
    scene.colors[name] = COLORS[color]
    return body


PAD_HALF = 0.055
PAD_TOP = 0.002  # a placed object's bottom rests at this height


def add_pad(scene: Scene, name: str, xy: list[float], half: float = PAD_HALF) -> int:
    """A thin blue target pad on the table; it collides, so placed objects rest on it."""
    body = _static_box([half, half, PAD_TOP / 2], [xy[0], xy[1], PAD_TOP / 2], COLORS["blue"])
    scene.objects[name] = body  # tracked like the rest: evaluation wants the target's place
    scene.colors[name] = COLORS["blue"]
    return body


# A two-box hammer: handle along its local x, head across it at +x. Both boxes sit on the table.
HANDLE = [0.09, 0.012, 0.012]  # half extents
HEAD = [0.022, 0.045, 0.022]
HEAD_X = HANDLE[0] + HEAD[0] - 0.005  # hammer origin (handle centre) to head centre, along x


def add_hammer(scene: Scene, name: str, xy: list[float], yaw: float) -> int:
    dz = HEAD[2] - HANDLE[2]  # lower the handle so both boxes touch the table
    shapes = dict(shapeTypes=[p.GEOM_BOX, p.GEOM_BOX], halfExtents=[HANDLE, HEAD],
                  collisionFramePositions=[[0, 0, -dz], [HEAD_X, 0, 0]])
    col = p.createCollisionShapeArray(**shapes)
    vis = p.createVisualShapeArray(
        shapeTypes=shapes["shapeTypes"], halfExtents=shapes["halfExtents"],
        visualFramePositions=shapes["collisionFramePositions"],
        rgbaColors=[[*COLORS["wood"], 1], [*COLORS["steel"], 1]],
    )
    body = p.createMultiBody(0.12, col, vis, [xy[0], xy[1], HEAD[2]], p.getQuaternionFromEuler([0, 0, yaw]))
    p.changeDynamics(body, -1, lateralFriction=1.0)
    scene.objects[name] = body
    scene.colors[name] = COLORS["wood"]  # the handle: most of the hammer's pixels
    return body
