"""InstructPix2Pix sources: they already are (current, future) pairs, so they become a pair dir, not episodes.

Two kinds, both accepted under one SRC:
- sample dirs: `<name>_0.jpg` (input), `<name>_1.jpg` (edited), `prompt.json` with "instruction"
  (the toolkit's) or "edit" (InstructPix2Pix's). A dir holding several pairs gives one sample each.
- tables: parquet files or `datasets` Arrow files with `input_image`, `edit_prompt`, `edited_image`
  columns (images as encoded bytes or {"bytes", "path"} structs). Read a few rows at a time: a
  100k-row table never sits in memory.

Output: OUT/<split>/<sample>/000000_0.jpg, 000000_1.jpg, prompt.json and OUT/pairs.json. The split
is the source's when it names one (a train/val/test dir, a `train-0000.parquet` file), else train.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from lftk.data.images import decode_image_bytes, open_image, save_rgb, to_square_rgb
from lftk.data.importers.base import BadSource, Context, Staging, natural_sorted, visible_files
from lftk.data.pairs import CURRENT_NAME, FUTURE_NAME, PAIRS_SUMMARY, PROMPT_NAME
from lftk.errors import LftkError, NotAvailableError

log = logging.getLogger(__name__)

SPLITS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
TABLE_SUFFIXES = (".parquet", ".arrow")
COLUMNS = ("input_image", "edit_prompt", "edited_image")
TABLE_BATCH = 64  # rows decoded at a time: bounded memory whatever the table's size
_INPUT = re.compile(r"^(.*)_0\.(jpe?g|png|webp)$", re.IGNORECASE)
_SPLIT_PREFIX = re.compile(r"^(train|validation|val|test)(?![a-z])", re.IGNORECASE)


@dataclass
class _Writer:
    root: Path  # the staging dir
    ctx: Context
    counts: dict[str, int] = field(default_factory=dict)
    horizons: set = field(default_factory=set)

    def write(self, split: str, name: str, current: Image.Image, future: Image.Image, prompt: dict, where: str) -> None:
        res = self.ctx.opts.resolution
        a, b = to_square_rgb(current, res), to_square_rgb(future, res)
        if a.size != b.size:  # only with --resolution 0: a pair must be one size to train on
            raise BadSource(where, f"mixed resolutions: input is {a.width}x{a.height}, edited is {b.width}x{b.height}")
        sample = self.root / split / name
        if sample.exists():
            raise BadSource(where, f"sample name {split}/{name} is taken by an earlier source")
        sample.mkdir(parents=True)
        save_rgb(np.asarray(a), sample / CURRENT_NAME)
        save_rgb(np.asarray(b), sample / FUTURE_NAME)
        (sample / PROMPT_NAME).write_text(json.dumps(prompt, indent=2) + "\n")
        self.counts[split] = self.counts.get(split, 0) + 1
        self.horizons.add(prompt.get("horizon"))


def _split_and_name(rel_parts: tuple[str, ...]) -> tuple[str, str]:
    if len(rel_parts) > 1 and rel_parts[0].lower() in SPLITS:
        return SPLITS[rel_parts[0].lower()], "__".join(rel_parts[1:])
    return "train", "__".join(rel_parts)


def _rel_parts(path: Path, src: Path) -> tuple[str, ...]:
    """Path parts below SRC; SRC itself (a sample dir or a table given directly) by its real name,
    so `.` and `..` name their dirs, never an empty or a parent-escaping sample name."""
    if path != src and src.is_dir():
        return path.relative_to(src).parts
    return (path.resolve().name or "sample",)


# ---------------------------------------------------------------------------------------------- sample dirs


def _read_prompt(d: Path, ctx: Context) -> dict:
    path = d / PROMPT_NAME
    try:
        prompt = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadSource(path, f"not valid JSON ({exc})") from None
    if not isinstance(prompt, dict):
        raise BadSource(path, "not a JSON object")
    text = ctx.opts.instruction or prompt.get("instruction") or prompt.get("edit")
    if not isinstance(text, str) or not text.strip():
        raise BadSource(path, "no 'instruction' (or InstructPix2Pix 'edit') text")
    return {**prompt, "instruction": text.strip()}


def _pairs_in(d: Path) -> list[tuple[str, Path, Path]]:
    """(name, input, edited) for every `<name>_0.<ext>` with a `<name>_1.<any image ext>` beside it."""
    files = {p.name.lower(): p for p in d.iterdir() if p.is_file()}
    found = []
    for p in natural_sorted(files.values()):
        m = _INPUT.match(p.name)
        if not m:
            continue
        names = [f"{m.group(1)}_1.{ext}".lower() for ext in ("jpg", "jpeg", "png", "webp")]
        edited = [files[n] for n in names if n in files]
        if edited:
            found.append((m.group(1), p, edited[0]))
    return found


def _import_sample_dir(d: Path, w: _Writer, ctx: Context) -> None:
    ctx.inside(d / PROMPT_NAME)
    prompt = _read_prompt(d, ctx)
    pairs = _pairs_in(d)
    if not pairs:
        raise BadSource(d, "no <name>_0.jpg / <name>_1.jpg pair beside prompt.json")
    split, name = _split_and_name(_rel_parts(d, ctx.src))
    for stem, current, future in pairs:
        try:
            images = open_image(ctx.inside(current)), open_image(ctx.inside(future))
        except BadSource as bad:
            ctx.ledger.skip(bad.path, bad.reason)
            continue
        except LftkError as exc:  # one bad pair does not cost the dir's other pairs
            ctx.ledger.skip(current.parent, str(exc))
            continue
        rel = "/".join(_rel_parts(d, ctx.src))
        out_prompt = {**prompt, "source": "ip2p", "source_path": f"{rel}/{stem}"}
        if ctx.opts.task:
            out_prompt["task"] = ctx.opts.task
        w.write(split, name if len(pairs) == 1 else f"{name}__{stem}", *images, out_prompt, str(current))


# ---------------------------------------------------------------------------------------------- tables


def _batches(path: Path) -> Iterator:
    """Record batches of the three columns; raises BadSource when the file is not a readable table."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise NotAvailableError(f"{path}: reading tables needs pyarrow: pip install 'lftk[data]'") from None
    try:
        if path.suffix.lower() == ".parquet":
            pf = pq.ParquetFile(path)
            names = pf.schema_arrow.names
            batches = pf.iter_batches(batch_size=TABLE_BATCH, columns=[c for c in COLUMNS if c in names])
        else:  # `datasets` writes the Arrow stream format; plain Arrow files use the file format
            source = pa.memory_map(str(path))
            try:
                reader = pa.ipc.open_stream(source)
                names, batches = reader.schema.names, iter(reader)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(source)
                names = reader.schema.names
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except (pa.ArrowException, OSError) as exc:
        raise BadSource(path, f"not a readable table ({exc})") from None
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise BadSource(path, f"missing column(s) {', '.join(missing)} (has {', '.join(names)})")
    try:
        for batch in batches:
            yield batch.select(list(COLUMNS)) if hasattr(batch, "select") else batch
    except (pa.ArrowException, OSError) as exc:
        raise BadSource(path, f"unreadable from here on ({exc})") from None


def _cell_image(cell, table: Path, where: str, ctx: Context) -> Image.Image:
    if isinstance(cell, dict):  # `datasets` Image feature: {"bytes": ..., "path": ...}
        if cell.get("bytes"):
            return decode_image_bytes(cell["bytes"], where)
        if cell.get("path"):
            p = Path(cell["path"])
            return open_image(ctx.inside(p if p.is_absolute() else table.parent / p))
    elif isinstance(cell, (bytes, bytearray)) and cell:
        return decode_image_bytes(bytes(cell), where)
    raise BadSource(where, "no image in this cell")


def _import_table(path: Path, w: _Writer, ctx: Context) -> None:
    ctx.inside(path)
    parts = _rel_parts(path, ctx.src)
    stem = Path(parts[-1]).stem
    m = _SPLIT_PREFIX.match(stem)
    split = SPLITS[m.group(1).lower()] if m else next((SPLITS[p.lower()] for p in parts[:-1] if p.lower() in SPLITS), "train")
    prefix = "__".join([*parts[:-1], stem])
    row = 0
    for batch in _batches(path):
        cols = {c: batch.column(i).to_pylist() for i, c in enumerate(COLUMNS)}  # (TABLE_BATCH,) python values
        for r in range(batch.num_rows):
            where = f"{path}#row{row}"
            try:
                current = _cell_image(cols["input_image"][r], path, f"{where}:input_image", ctx)
                future = _cell_image(cols["edited_image"][r], path, f"{where}:edited_image", ctx)
                text = ctx.opts.instruction or cols["edit_prompt"][r]
                if not isinstance(text, str) or not text.strip():
                    raise BadSource(where, "empty edit_prompt")
                prompt = {"instruction": text.strip(), "source": "ip2p", "source_path": f"{'/'.join(parts)}#row{row}"}
                if ctx.opts.task:
                    prompt["task"] = ctx.opts.task
                w.write(split, f"{prefix}__r{row:06d}", current, future, prompt, where)
            except (BadSource, LftkError) as exc:  # one bad row costs that row only
                reason = exc.reason if isinstance(exc, BadSource) else str(exc).removeprefix(f"{where}:")
                ctx.ledger.skip(where, reason)
            row += 1


# ---------------------------------------------------------------------------------------------- driver


def import_pairs(ctx: Context, out: Path) -> dict:
    src = ctx.src
    if src.is_file():
        tables, dirs = ([src], []) if src.suffix.lower() in TABLE_SUFFIXES else ([], [])
    else:
        tables = visible_files(src, TABLE_SUFFIXES)
        dirs = sorted({p.parent for p in visible_files(src, (".json",)) if p.name == PROMPT_NAME})
        dirs = natural_sorted(dirs, src.parent)
    if not tables and not dirs:
        raise LftkError(f"{src}: no InstructPix2Pix sample dirs (prompt.json + *_0.jpg + *_1.jpg) or tables ({', '.join(TABLE_SUFFIXES)})")
    with Staging(out) as stage:
        w = _Writer(stage.tmp, ctx)
        for source, reader in [(d, _import_sample_dir) for d in dirs] + [(t, _import_table) for t in tables]:
            try:
                reader(source, w, ctx)
            except BadSource as bad:
                ctx.ledger.skip(bad.path, bad.reason)
        if not w.counts:
            raise LftkError(f"{src}: no usable pair among {len(dirs)} sample dir(s) and {len(tables)} table(s) (see the warnings)")
        horizons = w.horizons - {None}
        if len(horizons) > 1:
            ctx.ledger.warn(src, f"pairs have different horizons {sorted(horizons)}: pairs.json records none")
        summary = {
            "format": "lftk-pairs",
            "version": 1,
            "kind": "pairs",
            "source_format": ctx.format,
            "source": str(src.resolve()),
            "horizon": horizons.pop() if len(horizons) == 1 and None not in w.horizons else None,
            "resolution": ctx.opts.resolution,
            "n_pairs": sum(w.counts.values()),
            "counts": {s: {"pairs": n} for s, n in sorted(w.counts.items())},
            "sources": {"sample_dirs": len(dirs), "tables": len(tables)},
            "skipped": ctx.ledger.skipped,
            "warnings": ctx.ledger.warnings,
        }
        stage.publish(PAIRS_SUMMARY, summary)
    return summary
