"""One Franka Panda: inverse kinematics, joint and gripper control, fixed-constraint grasps."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pybullet as p

ARM_JOINTS = list(range(7))
FINGERS = (9, 10)
HAND_LINK = 8
EE_LINK = 11  # panda_grasptarget: the point between the fingertips
OPEN_WIDTH = 0.04  # per finger: 8 cm between the pads
# Elbow up, hand down in front of the base: the pose IK's null space is pulled towards.
HOME = [0.0, -0.55, 0.0, -2.35, 0.0, 1.8, math.pi / 4]
# Joint 3 turned so the elbow leans outwards, away from the shared workspace and the camera.
ELBOW_SPLAY = 0.8
# Bases face +y; with HOME's wrist the hand's x axis then points along +y too (yaw pi/2).
BASE_YAW = math.pi / 2
NATURAL_YAW = math.pi / 2
ARM_FORCES = [87.0] * 4 + [12.0] * 3
POSITION_GAIN = 0.3  # low gain: smooth motion, no overshoot when the target jumps
FINGER_FORCE = 30.0


def top_down(yaw: float, tilt: float = 0.0) -> list[float]:
    """Quaternion of a hand pointing down with its x axis at `yaw` (fingers close across it),
    pitched by `tilt` about the finger axis (what swings a held hammer)."""
    return list(p.getQuaternionFromEuler([math.pi, tilt, yaw]))


@dataclass
class Arm:
    body: int
    name: str
    lower: list[float] = field(default_factory=list)
    upper: list[float] = field(default_factory=list)
    rest: list[float] = field(default_factory=list)
    held: int | None = None  # body id of the object attached to the hand
    constraint: int | None = None
    hold_width: float = 0.0

    @classmethod
    def load(cls, urdf: str, name: str, base: list[float], outward: float, start: list[float]) -> "Arm":
        """`outward`: +1 when +x points away from the other arm. The arm starts still, its hand
        at `start`, pointing down."""
        body = p.loadURDF(urdf, base, p.getQuaternionFromEuler([0, 0, BASE_YAW]), useFixedBase=True)
        rest = list(HOME)
        rest[2] = -outward * ELBOW_SPLAY
        arm = cls(body, name, rest=rest)
        movable = [j for j in range(p.getNumJoints(body)) if p.getJointInfo(body, j)[2] != p.JOINT_FIXED]
        for j in movable:
            info = p.getJointInfo(body, j)
            arm.lower.append(info[8])
            arm.upper.append(info[9])
        for j in FINGERS:
            p.resetJointState(body, j, OPEN_WIDTH)
        q = rest
        for _ in range(8):  # IK from the rest pose, snapped to, until the hand sits at `start`
            for j, v in zip(ARM_JOINTS, q):
                p.resetJointState(body, j, v)
            q = arm.ik(start, top_down(NATURAL_YAW))
        for j, v in zip(ARM_JOINTS, q):
            p.resetJointState(body, j, v)
        arm.command(q, 1.0)
        return arm

    # --------------------------------------------------------------------------------- state

    def ee_pos(self) -> list[float]:
        return list(p.getLinkState(self.body, EE_LINK, computeForwardKinematics=True)[4])

    def ee_pose(self) -> tuple[list[float], list[float]]:
        state = p.getLinkState(self.body, EE_LINK, computeForwardKinematics=True)
        return list(state[4]), list(state[5])

    def finger_width(self) -> float:
        return sum(p.getJointState(self.body, j)[0] for j in FINGERS)

    # ------------------------------------------------------------------------------- control

    def ik(self, pos: list[float], orn: list[float]) -> list[float]:
        rest = self.rest + [OPEN_WIDTH, OPEN_WIDTH]
        ranges = [u - lo for lo, u in zip(self.lower, self.upper)]
        q = p.calculateInverseKinematics(
            self.body, EE_LINK, pos, orn,
            lowerLimits=self.lower, upperLimits=self.upper, jointRanges=ranges, restPoses=rest,
            maxNumIterations=50, residualThreshold=1e-4,
        )
        return list(q[:7])

    def command(self, q: list[float], grip: float) -> None:
        """Drive the joints towards `q`; grip 1 = open, 0 = closed (or the held object's width)."""
        p.setJointMotorControlArray(
            self.body, ARM_JOINTS, p.POSITION_CONTROL, targetPositions=q,
            forces=ARM_FORCES, positionGains=[POSITION_GAIN] * 7,
        )
        width = OPEN_WIDTH * grip
        if self.held is not None:
            # Fingers pass through a held object (collisions off): stop them where they closed.
            width = max(width, self.hold_width / 2)
        p.setJointMotorControlArray(
            self.body, list(FINGERS), p.POSITION_CONTROL, targetPositions=[width, width],
            forces=[FINGER_FORCE] * 2,
        )

    # ------------------------------------------------------------------------------ grasping

    def between_fingers(self, obj: int, max_offset: float = 0.03) -> bool:
        """True when both finger pads touch `obj` near the grasp point (not at the tips' edge or
        the palm). Friction alone lets a swung hammer slip; this keeps success labels honest."""
        per_finger = [p.getContactPoints(self.body, obj, linkIndexA=f) for f in FINGERS]
        if not all(per_finger):
            return False
        points = np.array([c[6] for contacts in per_finger for c in contacts])  # on the object
        ee, orn = self.ee_pose()
        rot = np.array(p.getMatrixFromQuaternion(orn)).reshape(3, 3)
        local = rot.T @ (points.mean(axis=0) - np.array(ee))  # in the hand frame
        # Along the approach axis (z) and along the pads (x); across the pads (y) is the gap.
        return bool(abs(local[2]) < max_offset and abs(local[0]) < max_offset)

    def attach(self, obj: int) -> None:
        hand_pos, hand_orn = p.getLinkState(self.body, HAND_LINK, computeForwardKinematics=True)[4:6]
        obj_pos, obj_orn = p.getBasePositionAndOrientation(obj)
        inv_pos, inv_orn = p.invertTransform(hand_pos, hand_orn)
        rel_pos, rel_orn = p.multiplyTransforms(inv_pos, inv_orn, obj_pos, obj_orn)
        self.constraint = p.createConstraint(
            self.body, HAND_LINK, obj, -1, p.JOINT_FIXED, [0, 0, 0],
            parentFramePosition=rel_pos, childFramePosition=[0, 0, 0], parentFrameOrientation=rel_orn,
        )
        p.changeConstraint(self.constraint, maxForce=500)
        for link in (HAND_LINK, *FINGERS):
            p.setCollisionFilterPair(self.body, obj, link, -1, 0)
        self.hold_width = self.finger_width()
        self.held = obj

    def release(self) -> None:
        if self.constraint is not None:
            p.removeConstraint(self.constraint)
        # Collisions between hand and object stay off: fingers opening inside it would fling it.
        self.constraint = None
        self.held = None
