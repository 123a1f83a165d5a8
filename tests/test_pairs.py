"""Episodes -> pairs -> PairSet, and `inspect_dir`, on small fake episodes built here (no simulator)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lftk.data import pairs as pairs_mod
from lftk.data.episodes import list_episodes, scan_episodes
from lftk.data.inspect import inspect_dir
from lftk.data.pairs import assign_splits, make_pairs, pair_starts, parse_split
from lftk.data.pairset import PairSet
from lftk.errors import LftkError

TASKS = ("block_hammer_beat", "block_handover")


def fake_frame(rng: np.random.Generator, i: int, size: int) -> np.ndarray:
    """A gradient background, a square that moves with i, and noise: frames differ and JPEG well."""
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.stack([xx * 255 // size, yy * 255 // size, np.full_like(xx, 96)], axis=-1).astype(np.int32)
    x0 = (i * 2) % (size - 8)
    img[8:16, x0 : x0 + 8] = (250, 40, 40)
    img += rng.integers(-12, 13, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_episode(ep_dir: Path, task: str, n_frames: int, size: int = 32, seed: int = 0, suffix: str = ".jpg") -> Path:
    ep_dir.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n_frames):
        Image.fromarray(fake_frame(rng, i, size)).save(ep_dir / f"{i}{suffix}", quality=90)
    meta = {"task": task, "instruction": f"do {task.replace('_', ' ')}", "fps": 10, "frames": n_frames, "seed": seed}
    (ep_dir / "episode.json").write_text(json.dumps(meta))
    return ep_dir


def write_fake_episodes(root: Path, tasks=TASKS, episodes: int = 4, frames: int = 30, size: int = 32) -> Path:
    for t, task in enumerate(tasks):
        for k in range(episodes):
            write_episode(root / task / f"episode{k}", task, frames, size, seed=100 * t + k)
    return root


@pytest.fixture(scope="module")
def episodes_root(tmp_path_factory) -> Path:
    return write_fake_episodes(tmp_path_factory.mktemp("episodes"))


def _samples_on_disk(out: Path) -> dict[str, list[dict]]:
    return {
        split: [json.loads(p.read_text()) for p in sorted((out / split).glob("*/prompt.json"))]
        for split in ("train", "val", "test")
    }


# ----------------------------------------------------------------------------------------- episodes


def test_list_episodes_sorts_numerically_and_skips_broken_dirs(tmp_path, caplog):
    root = tmp_path / "eps"
    write_episode(root / "t" / "episode2", "t", 12, seed=2)
    write_episode(root / "t" / "episode10", "t", 12, seed=10)
    bad_json = write_episode(root / "t" / "episode3", "t", 12)
    (bad_json / "episode.json").write_text("{not json")
    no_frames = root / "t" / "episode4"
    no_frames.mkdir()
    (no_frames / "episode.json").write_text(json.dumps({"instruction": "x"}))
    gap = write_episode(root / "t" / "episode5", "t", 12)
    (gap / "7.jpg").unlink()
    write_episode(root / "t" / ".episode6.partial", "t", 12)  # an unfinished write: ignored, not "skipped"

    with caplog.at_level(logging.WARNING):
        scan = scan_episodes(root)
    assert [e.name for e in scan.episodes] == ["episode2", "episode10"]  # numeric, not lexical
    ep = scan.episodes[0]
    assert [p.name for p in ep.frame_paths] == [f"{i}.jpg" for i in range(12)]  # 10.jpg after 9.jpg
    assert ep.task == "t" and ep.instruction == "do t" and ep.meta["fps"] == 10
    assert {s.path for s in scan.skipped} == {bad_json, no_frames, gap}
    for d in (bad_json, no_frames, gap):
        assert str(d) in caplog.text
    assert "missing 7" in caplog.text
    assert list_episodes(root) == scan.episodes


def test_empty_or_missing_root_names_it(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LftkError, match=str(empty)):
        list_episodes(empty)
    with pytest.raises(LftkError, match="not found"):
        list_episodes(tmp_path / "nope")


# ------------------------------------------------------------------------------------------- pairs


@pytest.mark.parametrize(("horizon", "stride", "per_episode"), [(10, 5, 4), (10, 1, 20), (29, 1, 1), (5, 7, 4)])
def test_pair_counts(episodes_root, tmp_path, horizon, stride, per_episode):
    assert len(pair_starts(30, horizon, stride)) == per_episode
    summary = make_pairs(episodes_root, tmp_path / "out", horizon=horizon, stride=stride)
    n_eps = len(TASKS) * 4
    assert summary["n_pairs"] == n_eps * per_episode
    assert sum(c["pairs"] for c in summary["counts"].values()) == n_eps * per_episode
    assert len(list((tmp_path / "out").glob("*/*/prompt.json"))) == n_eps * per_episode


def test_pair_files_are_the_source_frames(episodes_root, tmp_path):
    out = tmp_path / "out"
    make_pairs(episodes_root, out, horizon=10, stride=5)
    sample = next(out.glob("*/block_handover__episode1__f0015"))  # in whichever split episode1 went
    src = episodes_root / "block_handover" / "episode1"
    assert (sample / "000000_0.jpg").read_bytes() == (src / "15.jpg").read_bytes()  # copied, not re-encoded
    assert (sample / "000000_1.jpg").read_bytes() == (src / "25.jpg").read_bytes()
    prompt = json.loads((sample / "prompt.json").read_text())
    assert prompt["instruction"] == "do block handover"
    got = (prompt["horizon"], prompt["task"], prompt["episode"], prompt["frame"])
    assert got == (10, "block_handover", "episode1", 15)
    assert Path(prompt["source_episode_dir"]) == src.resolve()


def test_split_is_by_episode_and_stratified(episodes_root, tmp_path):
    out = tmp_path / "out"
    summary = make_pairs(episodes_root, out, horizon=10, stride=5)
    on_disk = _samples_on_disk(out)
    eps = {s: {(p["task"], p["episode"]) for p in rows} for s, rows in on_disk.items()}
    assert not (eps["train"] & eps["val"]) and not (eps["train"] & eps["test"]) and not (eps["val"] & eps["test"])
    assert sum(map(len, eps.values())) == len(TASKS) * 4
    for split in ("train", "val", "test"):
        assert {t for t, _ in eps[split]} == set(TASKS), f"every task with >= 3 episodes is in {split}"
        assert sorted(summary["episodes"][split]) == sorted(f"{t}/{e}" for t, e in eps[split])
        assert summary["counts"][split]["pairs"] == len(on_disk[split])
    assert summary["split_ratios"] == {"train": 0.8, "val": 0.1, "test": 0.1}


def test_split_is_deterministic_and_depends_on_seed(episodes_root, tmp_path):
    a = make_pairs(episodes_root, tmp_path / "a", horizon=10, stride=10, seed=3)
    b = make_pairs(episodes_root, tmp_path / "b", horizon=10, stride=10, seed=3)
    assert a == b
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*"))  # noqa: E731
    assert files(tmp_path / "a") == files(tmp_path / "b")
    episodes = list_episodes(episodes_root)
    assignments = {str(assign_splits(episodes, (0.5, 0.25, 0.25), seed)) for seed in range(6)}
    assert len(assignments) > 1


def test_every_split_filled_when_tasks_have_few_episodes(tmp_path):
    root = tmp_path / "eps"
    for t in ("a", "b", "c"):
        write_episode(root / t / "episode0", t, 15, seed=ord(t))
    summary = make_pairs(root, tmp_path / "out", horizon=10, stride=5)
    assert all(summary["counts"][s]["episodes"] == 1 for s in ("train", "val", "test"))


def test_fewer_than_three_episodes_warns_which_splits_are_empty(tmp_path, caplog):
    root = tmp_path / "eps"
    for k in range(2):
        write_episode(root / "t" / f"episode{k}", "t", 15, seed=k)
    with caplog.at_level(logging.WARNING):
        summary = make_pairs(root, tmp_path / "out", horizon=10, stride=5)
    assert "split(s) val, test are empty" in caplog.text
    assert summary["counts"]["train"]["episodes"] == 2
    assert len(PairSet(tmp_path / "out", "val")) == 0  # the dir is there, empty


def test_short_episode_is_skipped_with_a_warning(tmp_path, caplog):
    root = write_fake_episodes(tmp_path / "eps", tasks=("t",), episodes=3, frames=20)
    short = write_episode(root / "t" / "episode3", "t", 10, seed=9)
    with caplog.at_level(logging.WARNING):
        summary = make_pairs(root, tmp_path / "out", horizon=10, stride=5)
    assert str(short) in caplog.text
    assert [s["path"] for s in summary["skipped"]] == [str(short)]
    assert all("t/episode3" not in eps for eps in summary["episodes"].values())
    assert summary["n_pairs"] == 3 * 2


def test_png_frames_become_jpeg_pairs(tmp_path):
    root = tmp_path / "eps"
    for k in range(3):
        write_episode(root / "t" / f"episode{k}", "t", 12, seed=k, suffix=".png")
    out = tmp_path / "out"
    make_pairs(root, out, horizon=10, stride=1)
    pair = next(iter(PairSet(out, "train")))
    with Image.open(pair.current) as im:
        assert im.format == "JPEG"
    src = np.asarray(Image.open(Path(pair.prompt["source_episode_dir"]) / f"{pair.prompt['frame']}.png"), dtype=float)
    assert np.abs(np.asarray(Image.open(pair.current), dtype=float) - src).mean() < 4


def test_output_is_atomic(episodes_root, tmp_path, monkeypatch):
    out = tmp_path / "out"
    make_pairs(episodes_root, out, horizon=10, stride=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir left beside it
    with pytest.raises(LftkError, match="not empty"):
        make_pairs(episodes_root, out, horizon=10, stride=10)

    calls = {"n": 0}
    real = pairs_mod._write_sample

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(pairs_mod, "_write_sample", failing)
    with pytest.raises(OSError, match="disk full"):
        make_pairs(episodes_root, tmp_path / "broken", horizon=10, stride=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # neither OUT nor a partial dir


def test_bad_arguments_are_user_errors(episodes_root, tmp_path):
    for split in ("0.8,0.1", "0.5,0.5,0.5", "0,0.5,0.5", "a,b,c"):
        with pytest.raises(LftkError):
            parse_split(split)
    assert parse_split("0.8,0.1,0.1") == (0.8, 0.1, 0.1)
    with pytest.raises(LftkError, match="horizon"):
        make_pairs(episodes_root, tmp_path / "o", horizon=0)
    with pytest.raises(LftkError, match="longer than the horizon"):
        make_pairs(episodes_root, tmp_path / "o", horizon=30)


# ------------------------------------------------------------------------------------ pairset/inspect


def test_pairset_lists_a_split_and_names_what_is_missing(episodes_root, tmp_path):
    out = tmp_path / "out"
    summary = make_pairs(episodes_root, out, horizon=10, stride=5)
    test = PairSet(out, "test")
    assert len(test) == summary["counts"]["test"]["pairs"]
    assert [p.name for p in test] == sorted(p.name for p in test)
    assert test[0].current.is_file() and test[0].future.is_file() and test[0].instruction.startswith("do ")
    assert sum(test.task_counts().values()) == len(test)
    with pytest.raises(LftkError, match="no split 'dev'.*train"):
        PairSet(out, "dev")
    first = test[0]
    (first.current.parent / "prompt.json").unlink()
    with pytest.raises(LftkError, match=first.name):
        PairSet(out, "test")


def test_inspect_pair_dir_and_episode_dir(episodes_root, tmp_path):
    out = tmp_path / "pairs"
    summary = make_pairs(episodes_root, out, horizon=10, stride=5)
    info = inspect_dir(out)
    assert info["kind"] == "pairs"
    assert info["n_samples"] == summary["n_pairs"]
    assert {s: v["samples"] for s, v in info["splits"].items()} == {s: c["pairs"] for s, c in summary["counts"].items()}
    assert set(info["tasks"]) == set(TASKS)
    assert info["resolutions"] == ["32x32"] and info["horizons"] == [10]
    sheet = Path(info["contact_sheet"])
    assert sheet == tmp_path / "pairs_sheet.png"
    with Image.open(sheet) as im:
        assert im.format == "PNG" and im.width > 2 * 128

    ep_info = inspect_dir(episodes_root, out=tmp_path / "eps.png")
    assert ep_info["kind"] == "episodes" and ep_info["n_episodes"] == 8
    assert ep_info["tasks"]["block_handover"] == {"episodes": 4, "frames": 120}
    assert ep_info["fps"] == [10] and ep_info["resolutions"] == ["32x32"]
    assert (tmp_path / "eps.png").is_file()
