"""`lftk data import --format lerobot`: v3.0 and v2.1, video and image cameras, one and two cameras,
episodes sharing one mp4, exact episode boundaries, per-frame vectors, bad data, determinism, and
`lftk data pairs` on the result."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("av", reason="the lerobot importer needs PyAV (lftk[data])")
pytest.importorskip("pyarrow", reason="the lerobot importer needs pyarrow (lftk[data])")

from lerobot_fixtures import write_v3, write_v21  # noqa: E402

from lftk.data.importers import import_data  # noqa: E402
from lftk.errors import LftkError  # noqa: E402

OPTS = {"horizon": 4, "resolution": 0}
TASKS = ["Pick up the red cube.", "Stack the blocks", "Pick up the red cube."]


def _episodes(out: Path) -> list[tuple[Path, dict]]:
    found = sorted(out.glob("*/episode*/episode.json"), key=lambda p: (p.parent.parent.name, int(p.parent.name[7:])))
    return [(p.parent, json.loads(p.read_text())) for p in found]


def _identify(rgb: np.ndarray) -> tuple[int, int, int]:
    """(episode, frame, camera) whose colour is nearest to this frame's mean (colours are 60, 12 and
    120 apart: the YUV round trip and JPEG move them by a few levels only)."""
    r, g, b = np.asarray(rgb, np.float64).reshape(-1, 3).mean(0)
    return round((r - 40) / 60), round((g - 20) / 12), round((b - 60) / 120)


def _check_frames(ep_dir: Path, ep: int, n: int, cam: int = 0) -> None:
    """Every frame is this episode's own, in order: none of a neighbour's, none shifted by one."""
    got = [_identify(Image.open(ep_dir / f"{k}.jpg").convert("RGB")) for k in range(n)]
    assert got == [(ep, k, cam) for k in range(n)], ep_dir
    assert not (ep_dir / f"{n}.jpg").exists()


def test_v3_video_episodes_sharing_one_mp4_import_whole_and_in_order(tmp_path):
    src = write_v3(tmp_path / "ds", [9, 11, 10], TASKS, cameras=("observation.images.top", "observation.images.wrist"))
    summary = import_data(src, tmp_path / "out", "lerobot", **OPTS)
    assert summary["episodes"] == 3 and summary["frames"] == 30 and not summary["skipped"]
    eps = _episodes(tmp_path / "out")
    assert [(d.parent.name, d.name) for d, _ in eps] == [
        ("pick_up_the_red_cube", "episode0"), ("pick_up_the_red_cube", "episode1"), ("stack_the_blocks", "episode0")]
    by_index = {m["episode_index"]: (d, m) for d, m in eps}
    for ep, n in enumerate([9, 11, 10]):
        d, meta = by_index[ep]
        assert meta["frames"] == n and meta["instruction"] == TASKS[ep] and meta["camera"] == "observation.images.top"
        assert meta["lerobot_version"] == "v3.0" and meta["source_path"] == f"episode_{ep:06d}"
        assert meta["observation.state"] == [[float(ep), float(k)] for k in range(n)]
        assert meta["action"] == [[round(k / 10, 6)] for k in range(n)]
        _check_frames(d, ep, n)


@pytest.mark.parametrize("name", ["v3-av1", "v3-image"])
def test_datasets_written_by_lerobots_own_writer(name, tmp_path):
    """v3.0 datasets made by the lerobot-dataset package (tests/data/lerobot/make.py): AV1 video with
    three episodes back to back per camera, and PNG frames in the parquet; the second camera."""
    src = Path(__file__).parent / "data" / "lerobot" / name
    summary = import_data(src, tmp_path / "out", "lerobot", camera="observation.images.wrist", **OPTS)
    assert (summary["episodes"], summary["frames"], summary["skipped"]) == (3, 30, [])
    lengths = {0: 9, 1: 11, 2: 10}
    for d, meta in _episodes(tmp_path / "out"):
        ep = meta["episode_index"]
        assert meta["frames"] == lengths[ep] and meta["instruction"] == TASKS[ep]
        assert meta["observation.state"][-1] == [float(ep), float(lengths[ep] - 1)]
        _check_frames(d, ep, lengths[ep], cam=1)


def test_the_camera_option_picks_a_camera_and_an_unknown_one_lists_them(tmp_path):
    src = write_v3(tmp_path / "ds", [6, 7], TASKS[:2], cameras=("observation.images.top", "observation.images.wrist"))
    import_data(src, tmp_path / "out", "lerobot", camera="observation.images.wrist", **OPTS)
    for d, meta in _episodes(tmp_path / "out"):
        assert meta["camera"] == "observation.images.wrist"
        _check_frames(d, meta["episode_index"], meta["frames"], cam=1)
    with pytest.raises(LftkError, match=r"not a camera.*observation\.images\.top, observation\.images\.wrist"):
        import_data(src, tmp_path / "out2", "lerobot", camera="observation.images.side", **OPTS)


def test_episode_selection(tmp_path):
    src = write_v3(tmp_path / "ds", [6, 7, 8], TASKS)
    summary = import_data(src, tmp_path / "out", "lerobot", episodes="0,2", **OPTS)
    assert sorted(m["episode_index"] for _, m in _episodes(tmp_path / "out")) == [0, 2]
    assert summary["options"]["episodes"] == "0,2"
    with pytest.raises(LftkError, match=r"episode\(s\) 5 not in this dataset"):
        import_data(src, tmp_path / "out2", "lerobot", episodes="1,5", **OPTS)
    with pytest.raises(LftkError, match="not an index or a range"):
        import_data(src, tmp_path / "out3", "lerobot", episodes="a-b", **OPTS)
    with pytest.raises(LftkError, match="--episodes picks LeRobot episodes; --format video has none"):
        import_data(src, tmp_path / "out4", "video", episodes="0", **OPTS)


def test_v3_image_features_in_the_parquet(tmp_path):
    src = write_v3(tmp_path / "ds", [6, 8], TASKS[:2], cameras=("observation.image",), dtype="image")
    summary = import_data(src, tmp_path / "out", "lerobot", **OPTS)
    assert summary["episodes"] == 2 and summary["frames"] == 14
    for d, meta in _episodes(tmp_path / "out"):
        _check_frames(d, meta["episode_index"], meta["frames"])


def test_v21_image_features_and_two_cameras(tmp_path):
    src = write_v21(tmp_path / "ds", [6, 7], TASKS[:2], cameras=("observation.images.top", "observation.images.wrist"),
                    dtype="image")
    summary = import_data(src, tmp_path / "out", "lerobot", camera="observation.images.wrist", **OPTS)
    assert summary["episodes"] == 2 and summary["frames"] == 13 and not summary["skipped"]
    for d, meta in _episodes(tmp_path / "out"):
        assert meta["lerobot_version"] == "v2.1"
        _check_frames(d, meta["episode_index"], meta["frames"], cam=1)


def test_v21_one_mp4_per_episode_then_pairs(tmp_path):
    from lftk.data.pairs import make_pairs

    src = write_v21(tmp_path / "ds", [8, 9], ["push the T", "push the T"])
    summary = import_data(src, tmp_path / "out", "lerobot", **OPTS)
    assert summary["episodes"] == 2 and not summary["skipped"]
    for d, meta in _episodes(tmp_path / "out"):
        assert meta["lerobot_version"] == "v2.1" and meta["task"] == "push_the_t"
        _check_frames(d, meta["episode_index"], meta["frames"])
    pairs = make_pairs(tmp_path / "out", tmp_path / "pairs", horizon=4, stride=1, seed=0)
    assert sum(v["pairs"] for v in pairs["counts"].values()) > 0
    prompt = json.loads(next((tmp_path / "pairs").glob("*/*/prompt.json")).read_text())
    assert prompt["instruction"] == "push the T"


def test_bad_episodes_are_named_and_skipped_or_refused_with_strict(tmp_path):
    src = write_v21(tmp_path / "ds", [8, 8, 8], TASKS)
    video = src / "videos" / "chunk-000" / "observation.images.top" / "episode_000001.mp4"
    video.write_bytes(video.read_bytes()[: len(video.read_bytes()) // 3])  # truncated
    lines = (src / "meta" / "episodes.jsonl").read_text().splitlines()
    row = json.loads(lines[2])
    row["length"] = 12  # the table disagrees with the video and the parquet
    lines[2] = json.dumps(row)
    (src / "meta" / "episodes.jsonl").write_text("\n".join(lines) + "\n")
    summary = import_data(src, tmp_path / "out", "lerobot", **OPTS)
    assert summary["episodes"] == 1
    reasons = {s["path"]: s["reason"] for s in summary["skipped"]}
    assert set(reasons) == {str(src / "episode_000001"), str(src / "episode_000002")}, reasons
    assert "says length 12" in reasons[str(src / "episode_000002")]
    with pytest.raises(LftkError, match="episode_00000[12].*--strict"):
        import_data(src, tmp_path / "strict", "lerobot", strict=True, **OPTS)
    assert not (tmp_path / "strict").exists()


def test_a_video_span_outside_its_file_is_skipped(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = write_v3(tmp_path / "ds", [6, 7], TASKS[:2])
    table_path = src / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    rows = pq.read_table(table_path).to_pylist()
    rows[1]["videos/observation.images.top/from_timestamp"] += 5.0  # past the end of the mp4
    rows[1]["videos/observation.images.top/to_timestamp"] += 5.0
    pq.write_table(pa.Table.from_pylist(rows), table_path)
    summary = import_data(src, tmp_path / "out", "lerobot", **OPTS)
    assert summary["episodes"] == 1
    (skip,) = summary["skipped"]
    assert skip["path"] == str(src / "episode_000001") and "holds 0 frames" in skip["reason"]


def test_unknown_versions_non_datasets_and_hub_ids_get_clear_errors(tmp_path):
    src = write_v21(tmp_path / "ds", [6], TASKS[:1])
    info = json.loads((src / "meta" / "info.json").read_text())
    (src / "meta" / "info.json").write_text(json.dumps({**info, "codebase_version": "v1.6"}))
    with pytest.raises(LftkError, match=r"codebase_version 'v1.6'.*v3.0"):
        import_data(src, tmp_path / "out", "lerobot", **OPTS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LftkError, match="meta/info.json.*not a LeRobot dataset"):
        import_data(tmp_path / "empty", tmp_path / "out", "lerobot", **OPTS)
    with pytest.raises(LftkError, match="hub id.*downloads nothing.*huggingface-cli download"):
        import_data("lerobot/pusht", tmp_path / "out", "lerobot", **OPTS)


def test_the_same_source_gives_byte_identical_trees(tmp_path):
    src = write_v3(tmp_path / "ds", [6, 7], TASKS[:2])
    import_data(src, tmp_path / "a", "lerobot", resolution=16, horizon=4)
    shutil.copytree(src, tmp_path / "moved")  # a moved dataset imports the same, too
    import_data(tmp_path / "moved", tmp_path / "b", "lerobot", resolution=16, horizon=4)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file() and p.name != "import.json")
    assert files
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


@pytest.mark.slow
def test_lftk_train_runs_on_an_imported_lerobot_dataset(tmp_path, tiny_pipeline_dir, monkeypatch):
    """The whole path a LeRobot user takes: import, pairs, a few training steps (DeepSpeed on CPU)."""
    from lftk.cli import main
    from lftk.data.pairs import make_pairs

    src = write_v3(tmp_path / "ds", [14, 14, 14, 14, 14], ["stack the blocks"] * 5)
    import_data(src, tmp_path / "eps", "lerobot", resolution=64, horizon=4)
    make_pairs(tmp_path / "eps", tmp_path / "pairs", horizon=4, stride=2, split=(0.6, 0.2, 0.2), seed=0)
    run = tmp_path / "run"
    monkeypatch.setattr("sys.argv", [
        "lftk", "train", "recipes/demo.yaml", f"output_dir={run}", f"data.path={tmp_path / 'pairs'}",
        f"model.base={tiny_pipeline_dir}", "max_steps=2", "train.batch_size=2", "train.warmup_steps=0",
        "sampling.guidance=[1.5]", "sampling.image_guidance=[1.5]", "sampling.keep=[0]", "sampling.keep_objects=[false]",
        "sampling.tune_samples=1", "sampling.steps=1",
    ])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code in (0, None)
    meta = json.loads((run / "final" / "lftk_model.json").read_text())
    assert meta["steps"] == 2 and meta["horizon"] == 4
