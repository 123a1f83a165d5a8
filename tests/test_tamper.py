"""Hostile but realistic input: stale caches, damaged and crafted checkpoints, a NaN on one rank,
torn logs, edited exports and malformed command lines get a clear refusal or a stated fallback."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import subprocess_env, write_pair_dir

from lftk.cli import main
from lftk.errors import LftkError

REPO = Path(__file__).resolve().parent.parent
UNET = Path("final/unet/diffusion_pytorch_model.safetensors")


def _cli(monkeypatch, *argv) -> int:
    monkeypatch.setattr("sys.argv", ["lftk", *argv])
    with pytest.raises(SystemExit) as info:
        main()
    return info.value.code or 0


# ------------------------------------------------------------------------------------ latent cache


def _pixels(path) -> torch.Tensor:
    from lftk.data.images import load_rgb

    return torch.from_numpy(load_rgb(path, 64).copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def test_latent_cache_follows_the_frames_not_the_sample_names(tmp_path, caplog):
    from lftk.data.pairset import PairSet
    from lftk.model.components import build_components
    from lftk.train import latent_cache

    vae = build_components("tiny", seed=0)["vae"].eval()
    pairs_dir = write_pair_dir(tmp_path / "pairs", {"train": 3}, seed=0)
    cache = tmp_path / "cache" / "train"
    latent_cache.build(_pixels, PairSet(pairs_dir, "train"), vae, cache)
    old = np.load(cache / "fut_mean.npy")

    shutil.rmtree(pairs_dir)  # the same sample names, other frames (another horizon, re-simulated episodes)
    write_pair_dir(tmp_path / "pairs", {"train": 3}, seed=1)
    latent_cache.build(_pixels, PairSet(pairs_dir, "train"), vae, cache)
    fresh = tmp_path / "fresh" / "train"
    latent_cache.build(_pixels, PairSet(pairs_dir, "train"), vae, fresh)
    assert not np.allclose(np.load(cache / "fut_mean.npy"), old), "the stale latents were reused"
    assert np.array_equal(np.load(cache / "fut_mean.npy"), np.load(fresh / "fut_mean.npy"))

    with open(cache / "cur_mode.npy", "r+b") as f:  # damage: one byte flipped in the data
        f.seek(-3, 2)
        byte = f.read(1)
        f.seek(-3, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    caplog.set_level("WARNING")
    latent_cache.build(_pixels, PairSet(pairs_dir, "train"), vae, cache)
    assert "cur_mode.npy is missing or damaged" in caplog.text
    assert np.array_equal(np.load(cache / "cur_mode.npy"), np.load(fresh / "cur_mode.npy"))
    assert [p.name for p in cache.parent.iterdir()] == ["train"], "staging leftovers beside the cache"


# ------------------------------------------------------------------------------------ checkpoints


def _train_cmd(run: Path, pairs: Path, base: Path, steps: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "lftk.cli", "train", "recipes/demo.yaml", f"output_dir={run}", f"data.path={pairs}",
        f"model.base={base}", f"max_steps={steps}", "train.batch_size=2", "train.checkpoint_every=2",
        "train.warmup_steps=0", "train.val_samples=0", "sampling.guidance=7.5", "sampling.image_guidance=1.5", *extra,
    ]


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def four_step_run(tmp_path_factory, tiny_pairs_dir, tiny_pipeline_dir) -> Path:
    """A run of 4 steps with checkpoints at 2 and 4 (read-only: copy it)."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    res = _run(_train_cmd(run, tiny_pairs_dir, tiny_pipeline_dir, 4))
    assert res.returncode == 0, res.stderr[-3000:]
    return run


def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(four_step_run, tmp_path, tiny_pairs_dir,
                                                                          tiny_pipeline_dir):
    run = tmp_path / "run"
    shutil.copytree(four_step_run, run)
    optim = next((run / "checkpoints" / "step0000004").glob("*optim_states.pt"))
    with open(optim, "r+b") as f:
        f.truncate(1000)
    res = _run(_train_cmd(run, tiny_pairs_dir, tiny_pipeline_dir, 6, "--resume"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{optim.name} has 1000 bytes" in res.stderr and "step0000002, the newest intact" in res.stderr

    straight = tmp_path / "straight"
    res = _run(_train_cmd(straight, tiny_pairs_dir, tiny_pipeline_dir, 6))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run / UNET).read_bytes() == (straight / UNET).read_bytes(), "resuming from step 2 changed the result"


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {_RunsCode.marker}",))


def test_resume_refuses_a_checkpoint_that_would_run_code(four_step_run, tmp_path, tiny_pairs_dir, tiny_pipeline_dir):
    from lftk.train.checkpoint import COMPLETE, _inventory

    run = tmp_path / "run"
    shutil.copytree(four_step_run, run)
    tag = run / "checkpoints" / "step0000004"
    model_states = tag / "mp_rank_00_model_states.pt"
    marker = tmp_path / "code-ran"
    _RunsCode.marker = marker
    state = torch.load(model_states, weights_only=False)
    state["payload"] = _RunsCode()
    torch.save(state, model_states)
    # The attacker rewrites the marker's digests too: the refusal must come from the loader, not the hash check.
    (tag / COMPLETE).write_text(json.dumps({"step": 4, "files": _inventory(tag)}))

    res = _run(_train_cmd(run, tiny_pairs_dir, tiny_pipeline_dir, 6, "--resume"))
    assert res.returncode == 2, res.stderr[-3000:]
    assert "refused" in res.stderr and "--trust-checkpoint" in res.stderr and "posix.system" in res.stderr
    assert not marker.exists(), "the checkpoint ran code on resume"


NAN_ON_RANK_1 = '''
import os, sys, torch
import lftk.train.loop as loop
real = loop.training_loss
def poisoned(*args, **kwargs):
    loss, terms, decoded, target = real(*args, **kwargs)
    if os.environ["RANK"] == "1" and not hasattr(poisoned, "done"):
        poisoned.done = True
        loss = loss * float("nan")
    return loss, terms, decoded, target
loop.training_loss = poisoned
from lftk.cli import main
try:
    main()
except SystemExit as exc:
    open(os.path.join(os.environ["EXIT_DIR"], "rank" + os.environ["RANK"]), "w").write(str(exc.code))
    raise
'''


def test_a_nan_on_one_rank_stops_every_rank_with_exit_2(tmp_path, tiny_pairs_dir, tiny_pipeline_dir):
    from lftk.train.engine import _free_port

    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1)
    exits = tmp_path / "exits"
    exits.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(script), "train", *_train_cmd(tmp_path / "run", tiny_pairs_dir, tiny_pipeline_dir, 4)[4:]]
    res = subprocess.run(cmd, cwd=REPO, env=subprocess_env(OMP_NUM_THREADS="1", EXIT_DIR=str(exits)),
                         capture_output=True, text=True, timeout=240)
    assert res.returncode != 0
    codes = {p.name: p.read_text() for p in exits.iterdir()}
    assert codes == {"rank0": "2", "rank1": "2"}, (codes, res.stderr[-3000:])
    assert res.stderr.count("loss is not finite on rank 1 at step 0") == 2


# ------------------------------------------------------------------------------------ recipes, logs, CLI


@pytest.mark.parametrize("override, says", [
    ("max_steps=0", "max_steps: Input should be greater than or equal to 1"),
    ("max_steps=-1", "max_steps: Input should be greater than or equal to 1"),
    ("train.lr=.inf", "train.lr: Input should be a finite number"),
    ("data=[1", "the value is not valid YAML"),
    ("max_steps.x=1", "'max_steps' is set both as a value and as a section"),
])
def test_bad_overrides_are_one_line_errors(monkeypatch, capsys, override, says):
    assert _cli(monkeypatch, "train", "recipes/demo.yaml", "max_steps=5", override, "--print-config") == 2
    assert says in capsys.readouterr().err


def test_a_recipe_of_random_bytes_is_refused(monkeypatch, capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(bytes(np.random.default_rng(0).integers(128, 256, 500, dtype=np.uint8)))
    assert _cli(monkeypatch, "train", str(recipe), "--print-config") == 2
    assert "not a text file" in capsys.readouterr().err


def test_a_torn_last_metrics_line_is_dropped_and_a_bad_middle_line_refused(tmp_path, caplog):
    from lftk.train.rundir import RunDir

    run = RunDir(tmp_path)
    run.metrics.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    caplog.set_level("WARNING")
    run.truncate_metrics(2)
    assert [r["step"] for r in run.read_metrics()] == [1, 2] and "torn last line 3" in caplog.text
    run.metrics.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(LftkError, match="line 2 is not a JSON object"):
        run.read_metrics()


def test_ip2p_import_of_dot_and_dotdot_names_the_sample_dirs(tmp_path, monkeypatch, tiny_pairs_dir):
    from lftk.data.importers import import_data
    from lftk.data.pairset import PairSet

    src = tmp_path / "src"
    for name in ("s0", "s0/inner"):
        d = src / name
        d.mkdir(parents=True)
        for k in (0, 1):
            shutil.copy(next((tiny_pairs_dir / "train").iterdir()) / f"000000_{k}.jpg", d / f"a_{k}.jpg")
        (d / "prompt.json").write_text('{"edit": "stack the blocks"}')
    monkeypatch.chdir(src / "s0")
    import_data(".", tmp_path / "one", "ip2p")
    assert sorted(PairSet(tmp_path / "one", "train").names()) == ["inner", "s0"]
    monkeypatch.chdir(src / "s0" / "inner")
    import_data("..", tmp_path / "two", "ip2p")  # was FileExistsError: the sample was named ".."
    assert sorted(PairSet(tmp_path / "two", "train").names()) == ["inner", "s0"]


def _png_header_claiming(path: Path, side: int) -> None:
    """A PNG whose header says side x side (the pixels never need to exist: Pillow refuses at the header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def test_infer_refuses_a_decompression_bomb_and_a_tiny_frame(monkeypatch, capsys, tmp_path, tiny_export_dir):
    bomb = tmp_path / "bomb.png"
    _png_header_claiming(bomb, 20000)
    args = ("infer", "--model", str(tiny_export_dir), "--instruction", "stack", "--frames", "1", "--steps", "1")
    assert _cli(monkeypatch, *args, "--image", str(bomb), "--out", str(tmp_path / "o1")) == 2
    assert "bomb.png: refused" in capsys.readouterr().err
    tiny = tmp_path / "tiny.png"
    from PIL import Image

    Image.new("RGB", (1, 1)).save(tiny)
    assert _cli(monkeypatch, *args, "--image", str(tiny), "--out", str(tmp_path / "o2")) == 2
    assert "1 px on its shorter side" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ exports


def test_an_export_with_an_edited_or_added_pipeline_file_or_no_digest_is_refused(tmp_path, tiny_export_dir):
    from lftk.runtime.manifest import MANIFEST, verify_manifest

    verify_manifest(tiny_export_dir)
    cases = {
        "edited": lambda d: (d / "pipeline/scheduler/scheduler_config.json").write_text(json.dumps(
            {**json.loads((d / "pipeline/scheduler/scheduler_config.json").read_text()), "timestep_spacing": "linspace"})),
        "added": lambda d: (d / "pipeline/unet/extra.bin").write_bytes(b"x"),
        "no digest": lambda d: (d / MANIFEST).write_text(json.dumps(
            {k: v for k, v in json.loads((d / MANIFEST).read_text()).items() if k != "digest"})),
    }
    says = {"edited": "scheduler_config.json: content differs", "added": "extra.bin: not in manifest.json",
            "no digest": "lacks its digest"}
    for name, tamper in cases.items():
        d = tmp_path / name.replace(" ", "_")
        shutil.copytree(tiny_export_dir, d)
        tamper(d)
        with pytest.raises(LftkError, match=says[name]):
            verify_manifest(d)


def test_imports_stay_inside_src_unless_follow_links(tmp_path, tiny_pairs_dir):
    from lftk.data.importers import import_data
    from lftk.data.pairset import PairSet

    sample = next((tiny_pairs_dir / "train").iterdir())
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(sample / "000000_1.jpg", outside / "secret_1.jpg")
    src = tmp_path / "src" / "s0"
    src.mkdir(parents=True)
    shutil.copy(sample / "000000_0.jpg", src / "a_0.jpg")
    (src / "a_1.jpg").symlink_to(outside / "secret_1.jpg")
    (src / "prompt.json").write_text('{"edit": "stack"}')
    with pytest.raises(LftkError, match="no usable pair"):
        import_data(tmp_path / "src", tmp_path / "out", "ip2p")
    summary = import_data(tmp_path / "src", tmp_path / "out", "ip2p", follow_links=True)
    assert summary["n_pairs"] == 1 and len(PairSet(tmp_path / "out", "train")) == 1

    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    table = tmp_path / "tsrc" / "train-0000.parquet"
    table.parent.mkdir()
    cell = {"bytes": None, "path": str(outside / "secret_1.jpg")}  # an absolute path out of SRC
    own = {"bytes": (sample / "000000_0.jpg").read_bytes(), "path": None}
    pq.write_table(pa.table({"input_image": [own], "edit_prompt": ["stack"], "edited_image": [cell]}), table)
    with pytest.raises(LftkError, match="no usable pair"):
        import_data(tmp_path / "tsrc", tmp_path / "tout", "ip2p")


# ------------------------------------------------------------------------------------ corruption harness


def _flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    i = min(int(len(data) * at), len(data) - 1)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


DAMAGE = {"flip": _flip, "truncate": _truncate}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_artifacts_are_refused_or_fallen_back_from(damage, tmp_path, four_step_run, tiny_export_dir,
                                                           tiny_pairs_dir, caplog):
    """Each kind of artifact lftk reads back, damaged: a clear refusal or a stated fallback, never a
    traceback or a silently different result."""
    from lftk.data.episodes import scan_episodes
    from lftk.data.pairset import PairSet, read_summary
    from lftk.runtime.manifest import verify_manifest
    from lftk.model.base import read_meta
    from lftk.train.checkpoint import verify
    from lftk.train.rundir import RunDir

    hurt = DAMAGE[damage]
    outcomes = {}

    run = tmp_path / "run"  # checkpoint files: the tag no longer verifies (resume then falls back: test above)
    shutil.copytree(four_step_run, run)
    for f in sorted((run / "checkpoints" / "step0000004").glob("*.pt")):
        hurt(f)
        outcomes[f.name] = verify(f.parent)
        assert outcomes[f.name] and f.name in outcomes[f.name]
        shutil.copy(four_step_run / "checkpoints" / "step0000004" / f.name, f)

    for rel in ("manifest.json", "onnx/unet.onnx", "pipeline/lftk_model.json", "pipeline/scheduler/scheduler_config.json"):
        exp = tmp_path / f"export-{rel.replace('/', '_')}"
        shutil.copytree(tiny_export_dir, exp)
        hurt(exp / rel)
        with pytest.raises(LftkError) as info:
            verify_manifest(exp)
        outcomes[rel] = str(info.value).splitlines()[0]

    pairs = tmp_path / "pairs"  # pairs.json and a sample's prompt.json
    shutil.copytree(tiny_pairs_dir, pairs)
    hurt(pairs / "pairs.json")
    with pytest.raises(LftkError, match="pairs.json"):
        read_summary(pairs)
    sample = next((pairs / "train").iterdir())
    hurt(sample / "prompt.json")
    with pytest.raises(LftkError, match="prompt.json"):
        PairSet(pairs, "train")

    meta_dir = tmp_path / "model"  # lftk_model.json of a model dir
    meta_dir.mkdir()
    (meta_dir / "lftk_model.json").write_text(json.dumps({"preset": "tiny", "resolution": 64, "sampling": {"steps": 20}}))
    hurt(meta_dir / "lftk_model.json")
    with pytest.raises(LftkError, match="lftk_model.json"):
        read_meta(meta_dir)

    for k in (0, 1):  # episode.json: the damaged episode is skipped, with the reason
        ep = tmp_path / "episodes" / "task" / f"episode{k}"
        ep.mkdir(parents=True)
        for i in (0, 1):
            shutil.copy(next((tiny_pairs_dir / "train").iterdir()) / "000000_0.jpg", ep / f"{i}.jpg")
        (ep / "episode.json").write_text(json.dumps({"instruction": "stack the blocks", "frames": 2}))
    hurt(tmp_path / "episodes" / "task" / "episode0" / "episode.json")
    scan = scan_episodes(tmp_path / "episodes")
    assert [e.path.name for e in scan.episodes] == ["episode1"] and "episode.json" in scan.skipped[0].reason

    rd = RunDir(tmp_path / "metrics-run")  # metrics.jsonl: a torn tail is dropped with a WARNING, damage inside refused
    rd.root.mkdir()
    rd.metrics.write_text("".join(json.dumps({"step": i, "loss": 0.5}) + "\n" for i in range(1, 9)))
    hurt(rd.metrics)
    caplog.set_level("WARNING")
    torn = not rd.metrics.read_bytes().endswith(b"\n")
    try:
        rows = rd.read_metrics()  # what is left is the log's first rows, each whole
        assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and rows
        assert ("torn last line" in caplog.text) == torn
    except LftkError as exc:
        assert "metrics.jsonl: line" in str(exc)


def test_atomic_outputs_get_the_permissions_a_plain_write_would(tmp_path):
    import os

    from lftk import atomic

    atomic.write_text(tmp_path / "a.txt", "x")
    (tmp_path / "b.txt").write_text("x")
    d = atomic.staging_dir(tmp_path / "out")
    (tmp_path / "c").mkdir()
    mode = lambda p: os.stat(p).st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "a.txt") == mode(tmp_path / "b.txt") and mode(d) == mode(tmp_path / "c")
