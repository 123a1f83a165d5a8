"""`lftk data import`: fixture files of every format are built here (HDF5 with JPEG bytes, pickles, frame
folders, a video written with PyAV, sample dirs, a parquet table), imported, and read back the way
`lftk data pairs` and training read them. A bad file of each kind is skipped with its name in the
warning, and --strict stops on it with nothing written."""

from __future__ import annotations

import io
import json
import logging
import pickle
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lftk.data.episodes import list_episodes
from lftk.data.importers import FORMATS, import_data
from lftk.data.importers.base import Frame, select_frames
from lftk.data.pairs import make_pairs
from lftk.data.pairset import PairSet
from lftk.errors import LftkError

h5py = pytest.importorskip("h5py")
av = pytest.importorskip("av")


def frame(i: int, w: int = 48, h: int = 32) -> np.ndarray:
    """A gradient whose blue channel encodes i, and a red square that moves with i: frames tell apart."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, (i * 9) % 256)], axis=-1).astype(np.uint8)
    x0 = (i * 3) % (w - 8)
    img[4:12, x0 : x0 + 8] = (250, 40, 40)
    return img


def jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def no_leftovers(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.partial-*"))


# ---------------------------------------------------------------------------------------------- robotwin-hdf5


def write_hdf5(path: Path, n: int, size=(48, 32), corrupt: int | None = None, cameras=("head_camera", "left_camera")) -> Path:
    """RoboTwin 2.0's layout: fixed-length, null-padded JPEG byte strings per camera, per-frame joint/pose arrays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for c, cam in enumerate(cameras):
            blobs = [jpeg(frame(i + 50 * c, *size)) for i in range(n)]
            if corrupt is not None:
                blobs[corrupt] = b"\xff\xd8\xff\xe0 not really a jpeg"
            width = max((len(b) for b in blobs), default=1) + 16  # padding the reader must strip
            f.create_dataset(f"observation/{cam}/rgb", data=np.array(blobs, dtype=f"S{width}"))
        f["joint_action/left_arm"] = np.arange(n * 6, dtype=np.float32).reshape(n, 6) / 7
        f["joint_action/vector"] = np.ones((n, 14), dtype=np.float64)
        f["endpose/left_endpose"] = np.zeros((n, 7), dtype=np.float32)
        f["endpose/meta"] = np.zeros(3)  # not one row per frame: not kept
    return path


def robotwin_root(root: Path) -> Path:
    for i in range(2):
        write_hdf5(root / "beat_block" / "demo_clean" / "data" / f"episode{i}.hdf5", 12)
    instr = root / "beat_block" / "demo_clean" / "instructions"
    instr.mkdir()
    (instr / "episode0.json").write_text(json.dumps({"seen": ["Beat the block.", "Hit it"], "unseen": ["Strike"]}))
    write_hdf5(root / "handover" / "demo_clean" / "data" / "episode0.hdf5", 12)
    return root


def test_formats_table_lists_every_format_once():
    assert list(FORMATS) == ["robotwin-hdf5", "robotwin-pkl", "frames", "video", "lerobot", "ip2p"]
    assert {f.writes for f in FORMATS.values()} == {"episodes", "pairs"}
    with pytest.raises(LftkError, match="did you mean 'frames'"):
        import_data(".", "x", "frame")


def test_hdf5_import_reads_layout_instructions_and_extras(tmp_path):
    src = robotwin_root(tmp_path / "rt")
    summary = import_data(src, tmp_path / "eps", "robotwin-hdf5", horizon=4, resolution=16)
    assert (summary["episodes"], summary["frames"], summary["skipped"]) == (3, 36, [])
    assert summary["per_task"] == {"beat_block": {"episodes": 2, "frames": 24}, "handover": {"episodes": 1, "frames": 12}}
    eps = list_episodes(tmp_path / "eps")
    assert [e.key for e in eps] == ["beat_block/episode0", "beat_block/episode1", "handover/episode0"]
    m0 = eps[0].meta
    assert eps[0].instruction == "Beat the block." and m0["instructions"] == {"seen": ["Beat the block.", "Hit it"], "unseen": ["Strike"]}
    assert eps[1].instruction == "beat block" and "instructions" not in eps[1].meta  # no instruction file: the task name
    assert (m0["fps"], m0["source_fps"], m0["fps_assumed"], m0["frames"], m0["resolution"]) == (10, None, True, 12, 16)
    assert (m0["source"], m0["source_path"], m0["camera"], m0["config"]) == (
        "robotwin-hdf5", "beat_block/demo_clean/data/episode0.hdf5", "head_camera", "demo_clean")
    assert len(m0["joint_action"]["left_arm"]) == 12 and m0["joint_action"]["left_arm"][1][0] == round(6 / 7, 6)
    assert set(m0["joint_action"]) == {"left_arm", "vector"} and set(m0["endpose"]) == {"left_endpose"}
    with Image.open(eps[0].frame_paths[0]) as im:
        assert (im.size, im.mode) == ((16, 16), "RGB")
    pairs = make_pairs(tmp_path / "eps", tmp_path / "pairs", horizon=4, stride=2, split=(1.0, 0.0, 0.0))
    assert pairs["n_pairs"] == 3 * 4


def test_hdf5_takes_a_task_dir_or_one_file_and_a_camera(tmp_path):
    src = robotwin_root(tmp_path / "rt")
    one_task = import_data(src / "beat_block", tmp_path / "a", "robotwin-hdf5", horizon=4, resolution=16)
    assert one_task["per_task"] == {"beat_block": {"episodes": 2, "frames": 24}}
    one_file = src / "handover" / "demo_clean" / "data" / "episode0.hdf5"
    assert import_data(one_file, tmp_path / "b", "robotwin-hdf5", horizon=4, resolution=0)["episodes"] == 1
    head = np.asarray(Image.open(tmp_path / "b" / "handover" / "episode0" / "0.jpg"))
    assert head.shape == (32, 48, 3)  # --resolution 0 keeps the size (no crop)
    import_data(one_file, tmp_path / "c", "robotwin-hdf5", horizon=4, resolution=0, camera="left_camera")
    left = np.asarray(Image.open(tmp_path / "c" / "handover" / "episode0" / "0.jpg"))
    assert abs(int(left[..., 2].mean()) - int(head[..., 2].mean())) > 100  # frame 50's blue, not frame 0's


def test_hdf5_fps_resamples_frames_and_extras_together(tmp_path):
    path = write_hdf5(tmp_path / "t" / "ep.hdf5", 12)
    import_data(path, tmp_path / "eps", "robotwin-hdf5", horizon=4, resolution=16, fps=20)
    meta = list_episodes(tmp_path / "eps")[0].meta
    assert (meta["frames"], meta["source_fps"], meta["source_frames"]) == (6, 20.0, [0, 2, 4, 6, 8, 10])
    source = np.arange(12 * 6, dtype=np.float32).reshape(12, 6) / 7  # as write_hdf5 stored it
    assert [row[0] for row in meta["joint_action"]["left_arm"]] == [round(float(source[j, 0]), 6) for j in (0, 2, 4, 6, 8, 10)]
    assert "fps_assumed" not in meta


def test_bad_hdf5_files_are_skipped_by_name_and_strict_stops(tmp_path, caplog):
    src = tmp_path / "rt"
    data = src / "task" / "cfg" / "data"
    write_hdf5(data / "episode0.hdf5", 12)
    truncated = write_hdf5(data / "episode1.hdf5", 12)
    truncated.write_bytes(truncated.read_bytes()[:3000])
    bad_jpeg = write_hdf5(data / "episode2.hdf5", 12, corrupt=5)
    empty = write_hdf5(data / "episode3.hdf5", 0)
    short = write_hdf5(data / "episode4.hdf5", 4)
    no_cam = write_hdf5(data / "episode5.hdf5", 12, cameras=("front_camera",))
    mixed = data / "episode6.hdf5"
    with h5py.File(mixed, "w") as f:
        blobs = [jpeg(frame(i, 48 if i < 6 else 40, 32)) for i in range(12)]
        f["observation/head_camera/rgb"] = np.array(blobs, dtype=f"S{max(map(len, blobs))}")
    with caplog.at_level(logging.WARNING):
        summary = import_data(src, tmp_path / "eps", "robotwin-hdf5", horizon=4, resolution=16)
    assert summary["episodes"] == 1 and [e.meta["source_path"] for e in list_episodes(tmp_path / "eps")] == [
        "task/cfg/data/episode0.hdf5"]
    reasons = {Path(s["path"].split(" ")[0].split(":")[0]).name: s["reason"] for s in summary["skipped"]}
    assert set(reasons) == {p.name for p in (truncated, bad_jpeg, empty, short, no_cam, mixed)}
    assert "HDF5" in reasons["episode1.hdf5"] and "[5]" in reasons["episode2.hdf5"]
    assert "empty" in reasons["episode3.hdf5"] and "too short for horizon 4" in reasons["episode4.hdf5"]
    assert "cameras here: front_camera" in reasons["episode5.hdf5"] and "mixed resolutions" in reasons["episode6.hdf5"]
    for p in (truncated, bad_jpeg, empty, short, no_cam, mixed):
        assert any(str(p) in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records), p
    with pytest.raises(LftkError, match=r"episode1\.hdf5.*--strict"):
        import_data(src, tmp_path / "strict", "robotwin-hdf5", horizon=4, resolution=16, strict=True)
    assert no_leftovers(tmp_path / "strict")


# ---------------------------------------------------------------------------------------------- robotwin-pkl


def write_pkl_episode(d: Path, n: int) -> Path:
    d.mkdir(parents=True)
    for j in range(n):
        obs = {"observation": {"head_camera": {"rgb": frame(j), "depth": np.zeros((32, 48))}},
               "joint_action": np.full(14, j / 3), "endpose": np.zeros(14)}
        (d / f"{j}.pkl").write_bytes(pickle.dumps(obs))
    return d


def test_pkl_needs_trust_then_imports_and_skips_a_truncated_pickle(tmp_path, caplog):
    src = tmp_path / "v1"
    write_pkl_episode(src / "stack_D435_pkl" / "episode0", 8)
    bad = write_pkl_episode(src / "stack_D435_pkl" / "episode1", 8)
    (bad / "3.pkl").write_bytes((bad / "3.pkl").read_bytes()[:100])
    with pytest.raises(LftkError, match="--trust-pickle") as info:
        import_data(src, tmp_path / "no", "robotwin-pkl", horizon=4)
    assert "runs whatever code" in str(info.value) and no_leftovers(tmp_path / "no")
    with caplog.at_level(logging.WARNING):
        summary = import_data(src, tmp_path / "eps", "robotwin-pkl", horizon=4, resolution=16, trust_pickle=True)
    assert summary["episodes"] == 1 and summary["skipped"][0]["path"] == str(bad / "3.pkl")
    assert any(str(bad / "3.pkl") in r.getMessage() for r in caplog.records)
    (ep,) = list_episodes(tmp_path / "eps")
    assert (ep.task, ep.n_frames, ep.meta["joint_action"][3][0]) == ("stack_D435", 8, 1.0)
    with pytest.raises(LftkError, match=r"3\.pkl"):
        import_data(src, tmp_path / "strict", "robotwin-pkl", horizon=4, trust_pickle=True, strict=True)
    assert no_leftovers(tmp_path / "strict")


# ---------------------------------------------------------------------------------------------- frames


def test_frames_natural_order_rgba_grey_and_bad_folders(tmp_path, caplog):
    src = tmp_path / "folders" / "pour"
    good = src / "ep_a"
    good.mkdir(parents=True)
    for i in range(12):  # frame_2 must come before frame_10; mixed suffixes and modes
        img = Image.fromarray(frame(i))
        img = img.convert("RGBA") if i == 1 else img.convert("L") if i == 2 else img
        img.save(good / (f"frame_{i}.png" if i < 3 else f"frame_{i}.jpg"), quality=95)
    (good / "notes.txt").write_text("ignored")
    corrupt = src / "ep_b"
    corrupt.mkdir()
    for i in range(12):
        Image.fromarray(frame(i)).save(corrupt / f"{i:06d}.jpg")
    (corrupt / "000007.jpg").write_bytes((corrupt / "000007.jpg").read_bytes()[:200])
    mixed = src / "ep_c"
    mixed.mkdir()
    for i in range(12):
        Image.fromarray(frame(i, 48 if i % 2 else 64)).save(mixed / f"{i}.jpg")
    short = src / "ep_d"
    short.mkdir()
    for i in range(3):
        Image.fromarray(frame(i)).save(short / f"{i}.jpg")

    with caplog.at_level(logging.WARNING):
        summary = import_data(src, tmp_path / "eps", "frames", horizon=4, resolution=0, instruction="pour water")
    assert summary["episodes"] == 1 and len(summary["skipped"]) == 3
    reasons = {Path(s["path"]).name: s["reason"] for s in summary["skipped"]}
    assert "000007.jpg" in reasons["ep_b"] and "mixed resolutions" in reasons["ep_c"] and "too short" in reasons["ep_d"]
    assert all(any(str(d) in r.getMessage() for r in caplog.records) for d in (corrupt, mixed, short))
    (ep,) = list_episodes(tmp_path / "eps")
    assert (ep.task, ep.instruction, ep.n_frames) == ("pour", "pour water", 12)
    blues = [int(np.asarray(Image.open(p))[20:, :, 2].mean()) for p in ep.frame_paths]
    assert all(abs(b - (i * 9) % 256) < 6 for i, b in enumerate(blues[3:], start=3)), blues  # natural order
    for p in ep.frame_paths[:3]:  # RGBA and greyscale became RGB
        with Image.open(p) as im:
            assert im.mode == "RGB"
    with pytest.raises(LftkError, match="000007.jpg"):
        import_data(src, tmp_path / "strict", "frames", horizon=4, strict=True)
    assert no_leftovers(tmp_path / "strict")


def test_select_frames_is_nearest_in_time():
    src = [Frame(j, None, lambda: None) for j in range(10)]
    assert [f.index for f in select_frames(src, Fraction(30))] == [0, 3, 6, 9]
    assert [f.index for f in select_frames(src, Fraction(5))] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9]
    assert [f.index for f in select_frames(src, Fraction(15))] == [0, 1, 3, 4, 6, 7, 9]  # ties go to the earlier frame
    assert [f.index for f in select_frames(src, None)] == list(range(10))


# ---------------------------------------------------------------------------------------------- video


def write_video(path: Path, n: int, fps: int = 30, size=(48, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.options = {"qscale": "2"}
        for i in range(n):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame(i, *size), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_video_resamples_to_10_fps_by_timestamps(tmp_path, caplog):
    src = tmp_path / "videos" / "wipe"
    write_video(src / "take1.mp4", 36, fps=30)
    bad = write_video(src / "take2.mp4", 36, fps=30)
    bad.write_bytes(bad.read_bytes()[:600])
    with caplog.at_level(logging.WARNING):
        summary = import_data(src, tmp_path / "eps", "video", horizon=4, resolution=32)
    assert summary["episodes"] == 1 and summary["skipped"][0]["path"] == str(bad)
    assert any(str(bad) in r.getMessage() for r in caplog.records)
    (ep,) = list_episodes(tmp_path / "eps")
    assert (ep.task, ep.meta["source_fps"], ep.meta["fps"]) == ("wipe", 30.0, 10)
    assert ep.meta["source_frames"] == list(range(0, 36, 3)) and ep.n_frames == 12
    blue = int(np.asarray(Image.open(ep.frame_paths[4]))[20:, :, 2].mean())
    assert abs(blue - 12 * 9) < 8  # output frame 4 is source frame 12
    # --fps overrides the container's rate: 36 frames at 15 fps span 2.33 s -> 24 ticks
    import_data(src / "take1.mp4", tmp_path / "slow", "video", horizon=4, resolution=32, fps=15)
    assert list_episodes(tmp_path / "slow")[0].meta["source_frames"][:5] == [0, 1, 3, 4, 6]
    with pytest.raises(LftkError, match="take2.mp4"):
        import_data(src, tmp_path / "strict", "video", horizon=4, strict=True)
    assert no_leftovers(tmp_path / "strict")


def test_same_source_twice_gives_identical_output(tmp_path):
    rt = robotwin_root(tmp_path / "rt")
    write_hdf5(rt / "handover" / "demo_clean" / "data" / "episode1.hdf5", 12, corrupt=3)  # its skip is in import.json
    write_video(tmp_path / "v" / "t" / "a.mp4", 24)
    for fmt, src in (("robotwin-hdf5", rt), ("video", tmp_path / "v")):
        import_data(src, tmp_path / f"{fmt}1", fmt, horizon=4, resolution=16)
        import_data(src, tmp_path / f"{fmt}2", fmt, horizon=4, resolution=16)
        assert tree(tmp_path / f"{fmt}1") == tree(tmp_path / f"{fmt}2")


# ---------------------------------------------------------------------------------------------- ip2p


def write_sample(d: Path, prompt: dict, stems=("000000",), corrupt: bool = False) -> Path:
    d.mkdir(parents=True)
    for k, stem in enumerate(stems):
        Image.fromarray(frame(k)).save(d / f"{stem}_0.jpg")
        Image.fromarray(frame(k + 5)).save(d / f"{stem}_1.jpg")
    if corrupt:
        (d / f"{stems[0]}_1.jpg").write_bytes(b"\xff\xd8 broken")
    (d / "prompt.json").write_text(json.dumps(prompt))
    return d


def test_ip2p_sample_dirs_and_tables_become_a_pair_dir(tmp_path, caplog):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    src = tmp_path / "ip2p"
    write_sample(src / "train" / "s1", {"instruction": "stack", "horizon": 100, "task": "stack"})
    write_sample(src / "test" / "s2", {"instruction": "stack", "horizon": 100})
    write_sample(src / "clip" / "0001", {"input": "a cat", "edit": "make it a dog", "output": "a dog"}, stems=("11", "22"))
    broken = write_sample(src / "clip" / "0002", {"edit": "x"}, corrupt=True)
    rows = [jpeg(frame(i)) for i in range(5)]
    rows[3] = b"not an image"
    table = pa.table({
        "input_image": [{"bytes": b, "path": None} for b in rows],
        "edit_prompt": [f"edit {i}" for i in range(5)],
        "edited_image": [{"bytes": jpeg(frame(i + 10)), "path": None} for i in range(5)],
    })
    (src / "hf").mkdir()
    pq.write_table(table, src / "hf" / "train-00000-of-00001.parquet")
    pq.write_table(table, src / "hf" / "test-00000-of-00001.parquet")
    truncated = src / "hf" / "test-00001-of-00002.parquet"
    truncated.write_bytes((src / "hf" / "test-00000-of-00001.parquet").read_bytes()[:500])

    with caplog.at_level(logging.WARNING):
        summary = import_data(src, tmp_path / "pairs", "ip2p", resolution=32)
    assert summary["kind"] == "pairs" and summary["counts"] == {"test": {"pairs": 5}, "train": {"pairs": 7}}
    assert summary["horizon"] is None  # some pairs carry no horizon
    skipped = [s["path"] for s in summary["skipped"]]
    hf = src / "hf"
    assert skipped == [str(broken), f"{hf}/test-00000-of-00001.parquet#row3", str(truncated), f"{hf}/train-00000-of-00001.parquet#row3"]
    assert summary["skipped"][1]["reason"].startswith("input_image: not a readable image")
    assert all(any(p in r.getMessage() for r in caplog.records) for p in skipped)
    train = PairSet(tmp_path / "pairs", "train")
    assert [p.name for p in train] == ["clip__0001__11", "clip__0001__22", "hf__train-00000-of-00001__r000000",
                                       "hf__train-00000-of-00001__r000001", "hf__train-00000-of-00001__r000002",
                                       "hf__train-00000-of-00001__r000004", "s1"]
    assert train[0].instruction == "make it a dog" and train[2].instruction == "edit 0" and train[-1].prompt["horizon"] == 100
    with Image.open(train[2].current) as im:
        assert im.size == (32, 32)
    with pytest.raises(LftkError, match="0002"):
        import_data(src, tmp_path / "strict", "ip2p", strict=True)
    assert no_leftovers(tmp_path / "strict")


def test_ip2p_reads_a_datasets_arrow_stream_with_path_images(tmp_path):
    pa = pytest.importorskip("pyarrow")
    src = tmp_path / "saved" / "validation"
    src.mkdir(parents=True)
    Image.fromarray(frame(1)).save(src / "in.png")
    schema = pa.schema([("input_image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("edit_prompt", pa.string()), ("edited_image", pa.binary())])
    batch = pa.record_batch([pa.array([{"bytes": None, "path": "in.png"}] * 3, schema.field(0).type),
                             pa.array(["open", "", "close"]), pa.array([jpeg(frame(2))] * 3)], schema=schema)
    with pa.OSFile(str(src / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(batch)  # `datasets`' save_to_disk writes this stream format
    summary = import_data(tmp_path / "saved", tmp_path / "pairs", "ip2p", resolution=16)
    assert summary["counts"] == {"val": {"pairs": 2}} and "empty edit_prompt" in summary["skipped"][0]["reason"]
    assert [p.instruction for p in PairSet(tmp_path / "pairs", "val")] == ["open", "close"]


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_says_which_layout_it_wrote_and_exits_2_on_bad_input(tmp_path, monkeypatch, capsys):
    from lftk.cli import main

    def run(*args: str) -> int:
        monkeypatch.setattr("sys.argv", ["lftk", "data", "import", *map(str, args)])
        try:
            main()
        except SystemExit as exc:
            return int(exc.code or 0)
        return 0

    write_pkl_episode(tmp_path / "v1" / "task" / "episode0", 6)
    assert run(tmp_path / "v1", tmp_path / "eps", "--format", "robotwin-pkl", "--horizon", "2") == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert run(tmp_path / "v1", tmp_path / "eps", "--format", "robotwin-pkl", "--horizon", "2", "--trust-pickle",
               "--resolution", "16", "--fps", "20", "--task", "stack") == 0
    out = capsys.readouterr().out
    assert "episodes dir" in out and "1 episodes" in out and "lftk data pairs" in out
    assert list_episodes(tmp_path / "eps")[0].n_frames == 3
    write_sample(tmp_path / "s" / "one", {"instruction": "x"})
    assert run(tmp_path / "s", tmp_path / "pairs", "--format", "ip2p") == 0
    assert "pair dir" in capsys.readouterr().out
    assert run(tmp_path / "s", tmp_path / "p2", "--format", "mp4") == 2
