"""Trajectory metrics: the colour locator against the simulator's own states, planted displacements
of an object and a hand recovered within a pixel, and n/a with a reason where they cannot apply."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lftk.data.images import load_rgb
from lftk.eval.scoring import build_target, score_prediction
from lftk.eval.trajectory import scene_state, trajectory_target

SIM_TASKS = ("blocks_stack_easy", "block_handover")


@pytest.fixture(scope="module")
def sim_episodes(tmp_path_factory) -> Path:
    """Three 128 px frames of two tasks: the objects still lie where the task put them."""
    pytest.importorskip("pybullet")
    from lftk.sim.generate import simulate

    root = tmp_path_factory.mktemp("sim") / "episodes"
    simulate(root, list(SIM_TASKS), episodes=1, frames=3, resolution=128, seed=3, workers=1)
    return root


def _episode(root: Path, task: str) -> tuple[Path, dict]:
    ep = root / task / "episode0"
    return ep, json.loads((ep / "episode.json").read_text())


@pytest.mark.parametrize("side", [128, 64])
@pytest.mark.parametrize("task", SIM_TASKS)
def test_colour_locator_agrees_with_the_projected_states(sim_episodes, task, side):
    ep, meta = _episode(sim_episodes, task)
    frame = load_rgb(ep / "0.jpg", side)
    target, why = trajectory_target(frame, meta, 0, 0)
    assert target is not None, why
    state, _ = scene_state(meta, 0, side)
    assert set(target.truth_xy) == set(meta["objects"])  # every object is found in an untouched scene
    for name, xy in target.truth_xy.items():
        assert np.linalg.norm(xy - state.objects[name]) < 2.0, (name, xy, state.objects[name])


def _shift_object(frame: np.ndarray, mask: np.ndarray, dx: int, dy: int, fill: np.ndarray) -> np.ndarray:
    """The object's pixels moved by (dx, dy); the table shows where it was."""
    out = frame.copy()
    out[mask] = fill
    rows, cols = np.nonzero(mask)
    out[rows + dy, cols + dx] = frame[rows, cols]
    return out


@pytest.mark.parametrize(("dx", "dy"), [(6, -4), (-3, 5), (1, 0)])
def test_planted_displacement_in_a_simulated_frame_is_reported_within_a_pixel(sim_episodes, dx, dy):
    from lftk.eval.trajectory import colour_masks

    ep, meta = _episode(sim_episodes, "blocks_stack_easy")
    truth = load_rgb(ep / "0.jpg", 128)
    target, _ = trajectory_target(truth, meta, 0, 0)
    name = "block_top"
    # Every pixel that is more block than table, so the moved block is the whole block.
    mask = colour_masks(truth, target.refs, target.table)[name]
    grown = np.zeros_like(mask)
    r, c = np.nonzero(mask)
    for oy in (-1, 0, 1):
        for ox in (-1, 0, 1):
            grown[np.clip(r + oy, 0, 127), np.clip(c + ox, 0, 127)] = True
    pred = _shift_object(truth, grown, dx, dy, target.table.round().astype(np.uint8))
    _, errors = target.score(pred)
    assert errors[name] == pytest.approx(np.hypot(dx, dy), abs=1.0)
    others = [n for n in target.truth_xy if n != name]
    assert all(errors[n] == pytest.approx(0.0, abs=0.5) for n in others)


def _identity_camera(side: int) -> dict:
    """view = projection = identity: world (x, y) in [-1, 1] maps straight onto the frame."""
    eye = np.eye(4).T.reshape(-1).tolist()  # column-major, as pybullet stores matrices
    return {"width": side, "height": side, "view_matrix": eye, "projection_matrix": eye}


def _world(col: float, row: float, side: int) -> list[float]:
    return [col / side * 2 - 1, 1 - row / side * 2, 0.0]


def _scene(side: int, block_at: tuple[int, int], hand_at: tuple[int, int]) -> np.ndarray:
    frame = np.full((side, side, 3), (165, 134, 112), np.uint8)  # table
    c, r = block_at
    frame[r - 2 : r + 3, c - 2 : c + 3] = (230, 40, 35)  # red block, 5x5
    c, r = hand_at
    frame[r - 4 : r + 5, c - 3 : c + 4] = (240, 240, 244)  # white hand ...
    frame[r - 1 : r + 2, c - 3 : c + 4] = (50, 50, 55)  # ... with a dark band
    frame[r + 2, c - 1 : c + 2] = (140, 144, 155)
    return frame


def test_planted_object_and_hand_displacements_in_a_synthetic_scene():
    side = 64
    block, hand = (20, 40), (44, 22)
    meta = {
        "camera": _identity_camera(side),
        "objects": {"block": {"color": [0.85, 0.15, 0.12]}},
        "states": [
            {"objects": {"block": _world(block[0] + 0.5, block[1] + 0.5, side) + [0, 0, 0, 1]},
             "ee": {"right": _world(hand[0] + 0.5, hand[1] + 0.5, side)}},
        ],
    }
    truth = _scene(side, block, hand)
    target, why = trajectory_target(truth, meta, 0, 0)
    assert target is not None, why
    assert np.allclose(target.truth_xy["block"], (block[0] + 0.5, block[1] + 0.5))
    assert target.score(truth)[0] == {"obj_err_px": 0.0, "obj_missing": 0.0, "ee_err_px": 0.0}

    metrics, errors = target.score(_scene(side, (block[0] + 4, block[1] - 3), (hand[0] - 3, hand[1] + 4)))
    assert errors["block"] == pytest.approx(5.0, abs=1.0)
    assert errors["right"] == pytest.approx(5.0, abs=1.0)
    assert metrics["obj_missing"] == 0.0

    blank = np.full_like(truth, (165, 134, 112))
    metrics, errors = target.score(blank)
    assert errors["block"] is None and metrics["obj_missing"] == 1.0 and metrics["obj_err_px"] is None


def test_no_states_or_no_episode_gives_na_with_the_reason(tmp_path):
    frame = np.zeros((32, 32, 3), np.uint8)
    real = tmp_path / "real_episode"
    real.mkdir()
    (real / "episode.json").write_text(json.dumps({"instruction": "stack blocks"}))
    cases = {
        "no simulator states": {"source_episode_dir": str(real)},
        "source_episode_dir": {},
        "missing or unreadable": {"source_episode_dir": str(tmp_path / "gone")},
    }
    for reason, prompt in cases.items():
        target = build_target(frame, frame, prompt, 0, 10)
        assert target.trajectory is None and reason in target.trajectory_na
        metrics, errors = score_prediction(frame, target)
        assert metrics["obj_err_px"] is None and metrics["ee_err_px"] is None and errors == {}
    assert "frame" in build_target(frame, frame, {"source_episode_dir": str(real)}, None, None).trajectory_na


def test_objects_sharing_a_colour_are_not_scored():
    side = 32
    meta = {
        "camera": _identity_camera(side),
        "objects": {"a": {"color": [0.85, 0.15, 0.12]}, "b": {"color": [0.85, 0.15, 0.12]}},
        "states": [{"objects": {"a": [0, 0, 0], "b": [0.5, 0.5, 0]}, "ee": {}}],
    }
    frame = np.full((side, side, 3), 120, np.uint8)
    target, _ = trajectory_target(frame, meta, 0, 0)
    assert target.truth_xy == {} and "shares its colour with b" in target.detail["a"]["na"]


def test_patch_matching_equals_a_brute_force_search():
    from lftk.eval.trajectory import match_patch

    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (40, 40, 3)).astype(np.uint8)
    template = frame[10:19, 25:34]  # centred on (col 29, row 14)
    template = np.clip(template.astype(int) + rng.integers(-20, 21, template.shape), 0, 255).astype(np.uint8)
    lo, hi = np.array([3, 2]), np.array([38, 30])
    padded = np.pad(frame.astype(float), ((4, 4), (4, 4), (0, 0)), mode="edge")
    ssd = {(c, r): ((padded[r : r + 9, c : c + 9] - template) ** 2).sum()
           for r in range(lo[1], hi[1] + 1) for c in range(lo[0], hi[0] + 1)}
    assert tuple(match_patch(frame, template, lo, hi)) == min(ssd, key=ssd.get) == (29, 14)
