"""`lftk data import`: real data into the toolkit's layouts. One table (FORMATS) names every format, what it
writes, which optional packages it needs; it drives the CLI's --format help and validation.

Episode formats write `OUT/<task>/episode<k>/<i>.jpg` + episode.json (what `lftk data pairs` reads);
`ip2p` sources already are (current, future) pairs, so they become a pair dir (what training reads).
Format modules are imported only when used: h5py, PyAV and pyarrow load only for their own format.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from lftk.errors import LftkError, NotAvailableError


@dataclass(frozen=True)
class Format:
    name: str  # what --format takes
    module: str  # lftk.data.importers.<module>
    writes: str  # "episodes" (an episodes dir) or "pairs" (a pair dir)
    needs: tuple[str, ...]  # optional packages (the `data` extra) checked before anything is read
    source: str  # one line for --help


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("robotwin-hdf5", "hdf5", "episodes", ("h5py",), "RoboTwin 2.0 <task>/<config>/data/episode<i>.hdf5"),
        Format("robotwin-pkl", "pkl", "episodes", (), "RoboTwin 1.x, one pickle per frame (needs --trust-pickle)"),
        Format("frames", "frames", "episodes", (), "one folder of numbered frames per episode"),
        Format("video", "video", "episodes", ("av",), "mp4/avi/webm/mkv/mov, one episode per file"),
        Format("lerobot", "lerobot", "episodes", ("av", "pyarrow"), "a local LeRobot dataset dir (v3.0, v2.1), video or image cameras"),
        Format("ip2p", "ip2p", "pairs", (), "InstructPix2Pix sample dirs or a parquet/datasets table"),
    )
}


def format_help() -> str:
    episodes = " | ".join(n for n, f in FORMATS.items() if f.writes == "episodes")
    pairs = " | ".join(n for n, f in FORMATS.items() if f.writes == "pairs")
    return f"{episodes} (write an episodes dir); {pairs} (writes a pair dir)"


def get_format(name: str) -> Format:
    if name in FORMATS:
        return FORMATS[name]
    close = difflib.get_close_matches(name, list(FORMATS), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise LftkError(f"--format {name!r}: unknown format{hint} (known: {', '.join(FORMATS)})")


def _check_needs(fmt: Format) -> None:
    missing = [m for m in fmt.needs if importlib.util.find_spec(m) is None]
    if missing:
        raise NotAvailableError(
            f"--format {fmt.name} needs {', '.join(missing)}: pip install 'lftk[data]'"
        )


def _hub_hint(fmt: Format, src: str) -> str:
    """For a missing SRC that reads like a hub id (owner/name): lftk reads local dirs, and how to get one."""
    from lftk.model.base import looks_like_hub_id

    if fmt.name != "lerobot" or not looks_like_hub_id(src):
        return ""
    return (
        f" (it reads like a Hugging Face hub id: lftk imports a local copy and downloads nothing; e.g. "
        f"`huggingface-cli download --repo-type dataset {src} --local-dir DIR`, then import DIR)"
    )


def import_data(src: Path | str, out: Path | str, format: str, **options) -> dict:
    """Import SRC into OUT; returns the summary (also written to OUT as import.json or pairs.json).
    `options` are ImportOptions fields (instruction, camera, fps, resolution (0: keep), horizon, trust_pickle, strict,
    task, follow_links, episodes)."""
    from lftk.data.importers.base import Context, ImportOptions, Ledger, import_episodes

    fmt = get_format(format)
    if options.get("resolution") == 0:  # the CLI's "keep the source size"
        options["resolution"] = None
    opts = ImportOptions(**options)
    if opts.resolution is not None and opts.resolution < 8:
        raise LftkError(f"--resolution {opts.resolution}: use 0 to keep the source size, or a side of at least 8 px")
    if opts.fps is not None and opts.fps <= 0:
        raise LftkError(f"--fps {opts.fps}: a frame rate must be > 0")
    if opts.horizon < 0:
        raise LftkError(f"--horizon {opts.horizon}: must be >= 0")
    if opts.episodes is not None and fmt.name != "lerobot":
        raise LftkError(f"--episodes picks LeRobot episodes; --format {fmt.name} has none (import a subset dir instead)")
    src, out = Path(src), Path(out)
    if not src.exists():
        raise LftkError(f"{src}: source not found{_hub_hint(fmt, str(src))}")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise LftkError(f"{out}: OUT must not be inside SRC (a second import would read the first one's output)")
    _check_needs(fmt)
    module = importlib.import_module(f"{__name__}.{fmt.module}")
    ctx = Context(src, opts, Ledger(opts.strict), fmt.name)
    if fmt.writes == "pairs":
        return module.import_pairs(ctx, out)
    return import_episodes(module, ctx, out)
