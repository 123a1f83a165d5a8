"""Built-in simulator: byte-exact determinism, motion that fills the episode, the episode layout,
and the camera projection the trajectory metrics rely on. Small settings keep it to seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pybullet")

from lftk.data.images import load_rgb  # noqa: E402
from lftk.errors import LftkError  # noqa: E402
from lftk.sim.camera import project  # noqa: E402
from lftk.sim.generate import simulate  # noqa: E402
from lftk.sim.tasks import TASKS  # noqa: E402

FRAMES, RES = 40, 64
PAPER_TASKS = {
    "block_hammer_beat": "beat the block with the hammer",
    "block_handover": "handover the blocks",
    "blocks_stack_easy": "stack blocks",
}


@pytest.fixture(scope="module", autouse=True)
def mesh_cache(tmp_path_factory):
    """Decimate the Panda into a fresh cache (exercises it) instead of the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LFTK_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def all_tasks(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sim") / "episodes"
    calls = []
    summary = simulate(out, None, episodes=1, frames=FRAMES, resolution=RES, seed=0, workers=2,
                       progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (3, 3)
    return out, summary


def _frames(ep: Path) -> list[np.ndarray]:
    return [load_rgb(ep / f"{i}.jpg").astype(np.float64) for i in range(FRAMES)]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_registry_has_the_paper_tasks():
    assert {name: t.instruction for name, t in TASKS.items()} == PAPER_TASKS


def test_layout_and_metadata(all_tasks):
    out, summary = all_tasks
    assert summary["episodes"] == 3 and summary["frames"] == 3 * FRAMES
    assert set(summary["tasks"]) == set(PAPER_TASKS)
    for task, instruction in PAPER_TASKS.items():
        ep = out / task / "episode0"
        names = {p.name for p in ep.iterdir()}
        assert names == {f"{i}.jpg" for i in range(FRAMES)} | {"episode.json"}
        meta = json.loads((ep / "episode.json").read_text())
        assert meta["task"] == task and meta["instruction"] == instruction
        assert (meta["episode"], meta["fps"], meta["frames"], meta["resolution"]) == (0, 10, FRAMES, RES)
        assert meta["source"] == "lftk-sim" and isinstance(meta["seed"], int)
        assert isinstance(meta["success"], bool)
        cam = meta["camera"]
        assert (cam["width"], cam["height"]) == (RES, RES)
        assert len(cam["view_matrix"]) == 16 and len(cam["projection_matrix"]) == 16
        assert len(meta["states"]) == FRAMES
        for state in meta["states"]:
            assert set(state["ee"]) == {"left", "right"} and all(len(v) == 3 for v in state["ee"].values())
            assert set(state["objects"]) == set(meta["objects"])
            assert all(len(v) == 7 for v in state["objects"].values())
        assert all(len(o["color"]) == 3 for o in meta["objects"].values())
        assert load_rgb(ep / "0.jpg").shape == (RES, RES, 3)
    assert not list(out.rglob("*.partial"))


@pytest.mark.parametrize("task", sorted(PAPER_TASKS))
def test_motion_fills_the_episode(all_tasks, task):
    frames = _frames(all_tasks[0] / task / "episode0")

    def diff(a, b):
        return float(np.abs(frames[a] - frames[b]).mean())

    n = FRAMES
    assert diff(0, n - 1) > 1.0, "first and last frame look the same"
    assert diff(n // 3, 2 * n // 3) > 1.0, "nothing moves mid-episode"
    # Motion spans the whole episode: every quarter has frames that change.
    for q in range(4):
        a, b = q * n // 4, (q + 1) * n // 4 - 1
        assert diff(a, b) > 0.3, f"quarter {q} is idle"
    states = json.loads((all_tasks[0] / task / "episode0" / "episode.json").read_text())["states"]
    ee = np.array([[*s["ee"]["left"], *s["ee"]["right"]] for s in states])
    assert np.ptp(ee, axis=0).max() > 0.1, "the hands barely move"


def test_same_seed_same_bytes_across_runs_and_processes(tmp_path):
    # Inline (both episodes in one process, reset between them) vs two worker processes.
    a, b = tmp_path / "a", tmp_path / "b"
    simulate(a, ["block_handover"], episodes=2, frames=FRAMES, resolution=RES, seed=3, workers=1)
    simulate(b, ["block_handover"], episodes=2, frames=FRAMES, resolution=RES, seed=3, workers=2)
    fa, fb = _files(a), _files(b)
    assert len(fa) == 2 * (FRAMES + 1)
    assert fa.keys() == fb.keys()
    assert [k for k in fa if fa[k] != fb[k]] == []


def test_different_seeds_give_different_layouts(tmp_path):
    starts = []
    for seed in (0, 1):
        out = tmp_path / f"s{seed}"
        simulate(out, ["blocks_stack_easy"], episodes=1, frames=2, resolution=32, seed=seed, workers=1)
        meta = json.loads((out / "blocks_stack_easy" / "episode0" / "episode.json").read_text())
        starts.append(meta["states"][0]["objects"])
    assert starts[0].keys() == starts[1].keys()
    for name in starts[0]:
        assert np.abs(np.subtract(starts[0][name][:3], starts[1][name][:3])).max() > 1e-3, name


def test_projection_lands_on_the_object(tmp_path):
    out = tmp_path / "p"
    simulate(out, ["blocks_stack_easy"], episodes=1, frames=2, resolution=128, seed=5, workers=1)
    ep = out / "blocks_stack_easy" / "episode0"
    meta = json.loads((ep / "episode.json").read_text())
    frame = load_rgb(ep / "0.jpg").astype(np.float64)
    pose = meta["states"][0]["objects"]
    checked = 0
    for name, info in meta["objects"].items():
        x, y, z = pose[name][:3]
        # The top face faces the camera: project its centre (blocks are 5 cm cubes, the pad flat).
        top = [x, y, z + (0.025 if name.startswith("block") else 0.0)]
        col, row = project([top], meta["camera"])[0]
        assert 0 <= col < 128 and 0 <= row < 128, name
        patch = frame[int(row) - 1:int(row) + 2, int(col) - 1:int(col) + 2].reshape(-1, 3).mean(axis=0)
        want = np.asarray(info["color"])
        cos = patch @ want / (np.linalg.norm(patch) * np.linalg.norm(want))
        assert cos > 0.95, f"{name}: pixel {patch.round()} at ({col:.1f}, {row:.1f}) is not {want}"
        checked += 1
    assert checked == 3  # two blocks and the pad
    # Points behind the camera are not given a pixel.
    behind = project([[0.0, -5.0, 1.75]], meta["camera"])
    assert np.isnan(behind).all()


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(LftkError, match="unknown task 'stack'.*blocks_stack_easy"):
        simulate(tmp_path / "x", ["stack"], episodes=1, frames=2, resolution=32)
    with pytest.raises(LftkError, match="frames must be >= 2"):
        simulate(tmp_path / "x", None, episodes=1, frames=1, resolution=32)
    assert not (tmp_path / "x").exists()


def test_a_rerun_resumes_the_missing_episodes_and_refuses_other_settings(tmp_path):
    out = tmp_path / "o"
    stale = out / "blocks_stack_easy" / ".episode1.partial"  # what a kill mid-episode leaves
    stale.mkdir(parents=True)
    (stale / "0.jpg").write_bytes(b"half")
    simulate(out, ["blocks_stack_easy"], episodes=1, frames=2, resolution=32, workers=1)
    first = (out / "blocks_stack_easy" / "episode0" / "1.jpg").read_bytes()
    summary = simulate(out, ["blocks_stack_easy"], episodes=2, frames=2, resolution=32, workers=1)
    assert summary["episodes"] == 2 and not stale.exists()
    assert (out / "blocks_stack_easy" / "episode0" / "1.jpg").read_bytes() == first, "a kept episode was rewritten"
    straight = tmp_path / "straight"
    simulate(straight, ["blocks_stack_easy"], episodes=2, frames=2, resolution=32, workers=1)
    for k in (0, 1):
        for name in ("0.jpg", "1.jpg"):
            a, b = out / "blocks_stack_easy" / f"episode{k}" / name, straight / "blocks_stack_easy" / f"episode{k}" / name
            assert a.read_bytes() == b.read_bytes(), f"resumed episode{k}/{name} differs from an uninterrupted run"
    with pytest.raises(LftkError, match="episode0 was made with other settings: resolution 32 \\(now 48\\)"):
        simulate(out, ["blocks_stack_easy"], episodes=2, frames=2, resolution=48, workers=1)


def test_light_panda_keeps_its_colours():
    from lftk.sim.meshes import light_panda_urdf

    urdf = light_panda_urdf()
    assert light_panda_urdf() == urdf  # cached
    objs = urdf.parent.glob("*.obj")
    faces = sum(sum(1 for ln in p.read_text().splitlines() if ln.startswith("f ")) for p in objs)
    assert 5_000 < faces < 15_000  # ~100k in the stock meshes
    palette = load_rgb(urdf.parent / "palette.png").reshape(-1, 3)
    assert palette.min() < 100 and palette.max() == 255  # dark joint accents survive next to white
