"""Kill anywhere: every writer SIGKILLed at points spread over its run leaves its output absent,
refused with a clear line, or complete and equal to an uninterrupted run's, loses no earlier good
data, and the same command run again completes (tests/faults.py has the harness).

Default tier: the fast writers at 2 kill points each. Slow tier (-m slow): all eight writers
(sim, import, pairs, latent cache, checkpoint, eval report, export, fp16/int8 variants) and an
in-place re-export, at 5 kill points each. Each prints one summary line.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env, write_pair_dir
from faults import Writer, assert_safe, probe, tree_digest

REPO = Path(__file__).resolve().parent.parent
LFTK = [sys.executable, "-m", "lftk.cli"]
ENV = {k: v for k, v in subprocess_env(OMP_NUM_THREADS="1").items()}


def _rm(*paths: Path) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    for p in paths:  # and any staging leftovers beside them
        for left in p.parent.glob(f".{p.name}.*") if p.parent.is_dir() else []:
            shutil.rmtree(left, ignore_errors=True) if left.is_dir() else left.unlink()


def _present(out: Path) -> tuple[str, int]:
    return ("complete" if out.exists() else "absent"), 0


def _writer(name: str, cmd: list[str], out: Path, **kw) -> Writer:
    kw.setdefault("state", lambda: _present(out))
    kw.setdefault("digest", lambda: tree_digest(out) if out.exists() else {})
    kw.setdefault("reset", lambda: _rm(out))
    return Writer(name, cmd, watch=kw.pop("watch", out.parent), env=ENV, cwd=REPO, **kw)


# ------------------------------------------------------------------------------------ writers


def sim_writer(root: Path) -> Writer:
    out = root / "episodes"
    cmd = [*LFTK, "data", "sim", str(out), "--tasks", "blocks_stack_easy", "--episodes", "3", "--frames", "12",
           "--resolution", "32", "--workers", "1"]

    def state():
        task = out / "blocks_stack_easy"
        done = [d for d in task.glob("episode*")] if task.is_dir() else []
        for d in done:  # an episode in place is whole: a kill never leaves half of one under its name
            assert (d / "episode.json").is_file() and len(list(d.glob("*.jpg"))) == 12, f"{d} is half-written"
        return ("complete" if len(done) == 3 else "absent"), 0

    return _writer("sim", cmd, out, state=state)


def import_writer(root: Path, pairs: Path) -> Writer:
    out = root / "imported"
    return _writer("import", [*LFTK, "data", "import", str(pairs / "train"), str(out), "--format", "ip2p"], out)


def pairs_writer(root: Path, episodes: Path) -> Writer:
    out = root / "pairs"
    return _writer("pairs", [*LFTK, "data", "pairs", str(episodes), str(out), "--horizon", "4", "--stride", "1"], out)


LATENT_SCRIPT = """
import sys, torch
from lftk.data.images import load_rgb
from lftk.data.pairset import PairSet
from lftk.model.base import load_pipeline
from lftk.train import latent_cache
pixels = lambda p: torch.from_numpy(load_rgb(p, 64).copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)
vae = load_pipeline(sys.argv[1]).vae
latent_cache.build(pixels, PairSet(sys.argv[2], "train"), vae, __import__("pathlib").Path(sys.argv[3]), batch_size=4)
"""


def latent_writer(root: Path, pipeline: Path, pairs: Path) -> Writer:
    from lftk.data.pairset import PairSet
    from lftk.train.latent_cache import _problem, frames_digest

    script = root / "cache_latents.py"
    script.write_text(LATENT_SCRIPT)
    out = root / "cache" / "train"
    items = PairSet(pairs, "train")

    def state():
        if not out.exists():
            return "absent", 0
        problem = _problem(out, items.names(), frames_digest(items))
        return ("complete", 0) if problem is None else ("refused", 0)  # a bad cache is rebuilt, never read

    return _writer("latent cache", [sys.executable, str(script), str(pipeline), str(pairs), str(out)], out,
                   state=state, watch=out.parent)


def _train_cmd(run: Path, pairs: Path, pipeline: Path) -> list[str]:
    return [*LFTK, "train", "recipes/demo.yaml", f"output_dir={run}", f"data.path={pairs}", f"model.base={pipeline}",
            "max_steps=8", "train.batch_size=2", "train.checkpoint_every=2", "train.warmup_steps=0",
            "train.val_samples=0", "sampling.guidance=7.5", "sampling.image_guidance=1.5"]


def checkpoint_writer(root: Path, pairs: Path, pipeline: Path) -> Writer:
    from lftk.train.checkpoint import complete_tags, verify

    run = root / "run"
    cmd = _train_cmd(run, pairs, pipeline)

    def state():
        tags = complete_tags(run / "checkpoints")
        lost = sum(verify(run / "checkpoints" / t) is not None for t in tags)  # a complete tag must load
        return ("complete" if (run / "final").is_dir() else "absent"), lost

    def rerun():
        return cmd + (["--resume"] if (run / "resolved_config.yaml").is_file() else [])

    return _writer("checkpoint", cmd, run, state=state, rerun=rerun,
                   digest=lambda: tree_digest(run / "final") if (run / "final").is_dir() else {})


def eval_writer(root: Path, pipeline: Path, pairs: Path) -> Writer:
    out = root / "report"
    cmd = [*LFTK, "eval", str(pipeline), "--data", str(pairs), "--split", "train", "--out", str(out), "--steps", "2",
           "--baselines", "copy", "--max-samples", "4", "--batch-size", "2"]

    def state():
        if not out.exists():
            return "absent", 0
        json.loads((out / "report.json").read_text())  # present means whole: a torn report fails here
        return "complete", 0

    return _writer("eval report", cmd, out, state=state)


def _export_state(out: Path, want_precision: str | None = None, had_export: bool = False) -> tuple[str, int]:
    from lftk.errors import LftkError
    from lftk.runtime.manifest import verify_manifest

    if not out.exists() or not (out / "manifest.json").exists():
        return "absent", int(had_export)
    try:
        manifest = verify_manifest(out)
    except LftkError:
        return "refused", int(had_export)
    if want_precision and not any(want_precision in c.get("variants", {}) for c in manifest["components"].values()):
        return "absent", 0  # the old export, whole: the variant was not added
    return "complete", 0


def export_writer(root: Path, pipeline: Path) -> Writer:
    out = root / "export"
    return _writer("export", [*LFTK, "export", str(pipeline), "--out", str(out)], out, state=lambda: _export_state(out))


def reexport_writer(root: Path, base_export: Path) -> Writer:
    """`lftk export EXP` in place: the previous export must survive any kill."""
    out = root / "export"

    def reset():
        _rm(out)
        shutil.copytree(base_export, out)

    reset()
    before = tree_digest(out)

    def state():
        got, lost = _export_state(out, had_export=True)
        if got == "complete" and tree_digest(out) == before:
            return "absent", 0  # the previous export, whole and verified: the new one never replaced it
        return got, lost

    return _writer("export in place", [*LFTK, "export", str(out), "--out", str(out)], out, state=state, reset=reset)


def variant_writer(root: Path, base_export: Path, precision: str, pairs: Path) -> Writer:
    out = root / "export"

    def reset():
        _rm(out)
        shutil.copytree(base_export, out)

    extra = ["--calib", str(pairs)] if precision == "int8" else []
    cmd = [*LFTK, "export", str(out), "--no-onnx", "--precision", precision, "--out", str(out), *extra]
    return _writer(f"{precision} variants", cmd, out, reset=reset,
                   state=lambda: _export_state(out, want_precision=precision, had_export=True))


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def fault_episodes(tmp_path_factory) -> Path:
    from lftk.sim.generate import simulate

    out = tmp_path_factory.mktemp("fault-sim") / "episodes"
    simulate(out, ["blocks_stack_easy"], episodes=6, frames=40, resolution=32, workers=1)
    return out


@pytest.fixture(scope="module")
def many_pairs(tmp_path_factory) -> Path:
    return write_pair_dir(tmp_path_factory.mktemp("fault-pairs") / "pairs", {"train": 160, "val": 2, "test": 2})


def _probe(w: Writer, n: int, tmp_path: Path, capsys) -> None:
    outcomes, line = probe(w, n, tmp_path / "logs")
    with capsys.disabled():
        print(f"\nfault harness: {line}")
    assert_safe(w, outcomes, tmp_path / "logs")


def _named_writer(name: str, root: Path, request) -> Writer:
    """The writer `name`, over fixtures fetched only when it needs them (the fast tier builds no export)."""
    fx = request.getfixturevalue
    makers = {
        "sim": lambda: sim_writer(root),
        "import": lambda: import_writer(root, fx("many_pairs")),
        "pairs": lambda: pairs_writer(root, fx("fault_episodes")),
        "latent cache": lambda: latent_writer(root, fx("tiny_pipeline_dir"), fx("many_pairs")),
        "checkpoint": lambda: checkpoint_writer(root, fx("tiny_pairs_dir"), fx("tiny_pipeline_dir")),
        "eval report": lambda: eval_writer(root, fx("tiny_pipeline_dir"), fx("tiny_pairs_dir")),
        "export": lambda: export_writer(root, fx("tiny_pipeline_dir")),
        "export in place": lambda: reexport_writer(root, fx("tiny_export_dir")),
        "fp16 variants": lambda: variant_writer(root, fx("tiny_export_dir"), "fp16", fx("tiny_pairs_dir")),
        "int8 variants": lambda: variant_writer(root, fx("tiny_export_dir"), "int8", fx("tiny_pairs_dir")),
    }
    root.mkdir()  # the writers' own dir: the harness's logs stay out of what it watches
    return makers[name]()


# ------------------------------------------------------------------------------------ default tier: fast writers


@pytest.mark.parametrize("name", ["sim", "import", "pairs", "latent cache"])
def test_fast_writers_survive_two_kills(name, tmp_path, capsys, request):
    _probe(_named_writer(name, tmp_path / "w", request), 2, tmp_path, capsys)


# ------------------------------------------------------------------------------------ slow tier: all writers, 5 kills


SLOW = ["sim", "import", "pairs", "latent cache", "checkpoint", "eval report", "export", "export in place",
        "fp16 variants", "int8 variants"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_every_writer_survives_five_kills(name, tmp_path, capsys, request):
    _probe(_named_writer(name, tmp_path / "w", request), 5, tmp_path, capsys)
