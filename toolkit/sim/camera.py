"""The fixed head camera: matrices, rendering with the CPU TinyRenderer, world -> pixel projection.

Matrices are stored the way pybullet returns them (16 floats, column-major, OpenGL clip space),
so `episode.json` carries exactly what rendered the frames and `project` can be used without
pybullet.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# High above and a little behind the arm bases, looking steeply down the table: the arms rise
# from the bottom corners, the elbows stay small, a raised hand never leaves the frame.
EYE = (0.0, -0.2, 1.75)
TARGET = (0.0, 0.44, 0.0)
UP = (0.0, 0.0, 1.0)
FOV_DEG = 40.0
NEAR, FAR = 0.05, 4.0
# Explicit TinyRenderer light: its defaults wash the frame out.
LIGHT = dict(
    lightDirection=[0.4, -0.6, 1.0], lightColor=[1.0, 1.0, 1.0], lightDistance=3.0,
    lightAmbientCoeff=0.5, lightDiffuseCoeff=0.6, lightSpecularCoeff=0.1, shadow=0,
)


@dataclass(frozen=True)
class HeadCamera:
    resolution: int

    def view_matrix(self) -> list[float]:
        import pybullet as p

        return list(p.computeViewMatrix(EYE, TARGET, UP))

    def projection_matrix(self) -> list[float]:
        import pybullet as p

        return list(p.computeProjectionMatrixFOV(FOV_DEG, 1.0, NEAR, FAR))

    def to_dict(self) -> dict:
        return {
            "width": self.resolution, "height": self.resolution,
            "eye": list(EYE), "target": list(TARGET), "fov_deg": FOV_DEG,
            "view_matrix": self.view_matrix(), "projection_matrix": self.projection_matrix(),
        }

    def render(self, backdrop: np.ndarray | None = None) -> np.ndarray:
        """(H, W, 3) uint8 RGB frame of the current world; `backdrop` fills pixels no body covers."""
        import pybullet as p

        r = self.resolution
        _, _, rgba, _, seg = p.getCameraImage(
            r, r, self.view_matrix(), self.projection_matrix(), renderer=p.ER_TINY_RENDERER, **LIGHT,
        )
        rgb = np.asarray(rgba, dtype=np.uint8).reshape(r, r, 4)[:, :, :3].copy()
        if backdrop is not None:
            empty = np.asarray(seg).reshape(r, r) < 0
            rgb[empty] = backdrop[empty]
        return rgb


def project(points_xyz, camera: dict) -> np.ndarray:
    """World points (N, 3) -> (N, 2) pixel coordinates (column, row) in the frame `camera`
    describes (the "camera" entry of an episode.json). Coordinates are continuous: pixel (c, r)
    covers [c, c+1) x [r, r+1), so int() of a result indexes the array. Points behind the camera
    come back as NaN."""
    pts = np.asarray(points_xyz, dtype=np.float64).reshape(-1, 3)
    view = np.asarray(camera["view_matrix"], dtype=np.float64).reshape(4, 4).T  # column-major
    proj = np.asarray(camera["projection_matrix"], dtype=np.float64).reshape(4, 4).T
    homo = np.concatenate([pts, np.ones((len(pts), 1))], axis=1)
    clip = homo @ (proj @ view).T  # (N, 4)
    w = clip[:, 3:4]
    with np.errstate(divide="ignore", invalid="ignore"):
        ndc = np.where(w > 1e-9, clip[:, :2] / w, np.nan)
    col = (ndc[:, 0] + 1.0) * 0.5 * camera["width"]
    row = (1.0 - ndc[:, 1]) * 0.5 * camera["height"]
    return np.stack([col, row], axis=1)
