"""Reading a pair dir: the samples of one split, as training and evaluation see them.

The listing is eager (every prompt.json is read up front) so that a broken sample fails at
start-up, naming its dir, rather than hours into a run.
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence, overload

import numpy as np

from lftk.data.pairs import CURRENT_NAME, FUTURE_NAME, PAIRS_SUMMARY, PROMPT_NAME
from lftk.errors import LftkError


@dataclass(frozen=True)
class Pair:
    name: str  # sample dir name, e.g. block_handover__episode3__f0040
    current: Path  # the frame the model sees
    future: Path  # the frame it should predict
    prompt: dict = field(compare=False)  # prompt.json: instruction, horizon, task, episode, frame, ...

    @property
    def instruction(self) -> str:
        return self.prompt["instruction"]

    @property
    def task(self) -> str:
        # Imported pair dirs may lack a task; they count as one group.
        return str(self.prompt.get("task", "unknown"))

    @property
    def horizon(self) -> int | None:
        """Frames between current and future frame; None for imported pairs that do not say."""
        return self.prompt.get("horizon")

    def format(self, template: str) -> str:
        """This pair's prompt; an error names its prompt.json."""
        return format_prompt(template, self.instruction, self.horizon, source=self.current.parent / PROMPT_NAME)


PROMPT_FIELDS = ("instruction", "horizon")  # horizon: frames ahead, as prompt.json and pairs.json count them


def template_fields(template: str) -> set[str]:
    """The fields a prompt template uses; LftkError for a field not in PROMPT_FIELDS or bad braces."""
    allowed = ", ".join(f"{{{f}}}" for f in PROMPT_FIELDS)
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise LftkError(f"prompt template {template!r}: {exc} (write a literal brace as {{{{ or }}}})") from None
    unknown = sorted(fields - set(PROMPT_FIELDS))
    if unknown:
        raise LftkError(f"prompt template {template!r}: unknown field(s) {unknown}; a template may use {allowed}")
    return fields


def format_prompt(template: str, instruction: str, horizon: int | None = None, *, source: object = None) -> str:
    """The text the model is conditioned on; the same rule at training, evaluation and run time.

    `horizon` (frames ahead) fills `{horizon}`; a template that uses it needs one. `source` (the
    pair's prompt.json, or whatever the prompt came from) is named in that error."""
    fields = template_fields(template)
    if "horizon" in fields and horizon is None:
        where = f"{source}" if source is not None else "this prompt"
        raise LftkError(
            f"prompt template {template!r} uses {{horizon}}, but {where} has no horizon "
            "(make the pairs with `lftk data pairs`, which records one per pair)"
        )
    try:
        return template.format(instruction=instruction, horizon=horizon)
    except (KeyError, IndexError, ValueError) as exc:  # e.g. a format spec that does not fit the value
        raise LftkError(f"prompt template {template!r}: {exc}") from None


def read_summary(root: Path | str) -> dict:
    """pairs.json of a pair dir, or {} for pair dirs made elsewhere."""
    from lftk.jsonfile import read_object

    return read_object(Path(root) / PAIRS_SUMMARY, missing={})


def split_names(root: Path | str) -> list[str]:
    """Sub-dirs of a pair dir that hold samples (train, val, test, or whatever an import made)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_pair(sample: Path) -> Pair:
    missing = [n for n in (CURRENT_NAME, FUTURE_NAME, PROMPT_NAME) if not (sample / n).is_file()]
    if missing:
        raise LftkError(f"{sample}: not a pair sample, missing {', '.join(missing)}")
    from lftk.jsonfile import read_object

    prompt = read_object(sample / PROMPT_NAME)
    if not isinstance(prompt.get("instruction"), str):
        raise LftkError(f"{sample / PROMPT_NAME}: expected a JSON object with an 'instruction' string")
    h = prompt.get("horizon")
    if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h < 1):
        raise LftkError(f"{sample / PROMPT_NAME}: 'horizon' is {h!r}; expected frames ahead, a whole number >= 1 (or no key)")
    return Pair(sample.name, sample / CURRENT_NAME, sample / FUTURE_NAME, prompt)


_NO_HORIZON = 0  # horizons are >= 1 (checked in _read_pair), so 0 marks "prompt.json has none"


class PairSet(Sequence[Pair]):
    """The samples of `root/<split>`, sorted by name. A split dir that exists but is empty gives 0 samples.

    Every sample is validated at start-up, but only compact columns are kept (names as one bytes
    array, instructions and tasks as indices into small tables, horizons as int32 with 0 for
    "none"): numpy arrays are shared by
    DataLoader workers page for page, where a list of Python objects is copied into each worker
    as it is touched (refcounts), so memory stays flat with the dataset size. `pairs[i]` re-reads
    that sample's prompt.json for the full dict; training uses the column accessors instead.
    """

    def __init__(self, root: Path | str, split: str):
        self.root = Path(root)
        self.split = split
        self.split_dir = self.root / split
        if not self.root.is_dir():
            raise LftkError(f"{self.root}: pair dir not found")
        if not self.split_dir.is_dir():
            have = ", ".join(split_names(self.root)) or "none"
            raise LftkError(f"{self.split_dir}: no split '{split}' in {self.root} (splits found: {have})")
        names, instr, tasks, horizons = [], [], [], []
        instructions: dict[str, int] = {}
        task_table: dict[str, int] = {}
        for entry in sorted(os.scandir(self.split_dir), key=lambda e: e.name):
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            pair = _read_pair(Path(entry.path))
            names.append(pair.name.encode())
            instr.append(instructions.setdefault(pair.instruction, len(instructions)))
            tasks.append(task_table.setdefault(pair.task, len(task_table)))
            horizons.append(pair.horizon or _NO_HORIZON)
        self._names = np.array(names, dtype=bytes) if names else np.zeros(0, dtype="S1")
        self._instr = np.array(instr, dtype=np.int32)
        self._task = np.array(tasks, dtype=np.int32)
        self._horizon = np.array(horizons, dtype=np.int32)
        self._instructions = list(instructions)
        self._tasks = list(task_table)

    def __len__(self) -> int:
        return len(self._names)

    def name(self, i: int) -> str:
        return self._names[i].decode()

    def current(self, i: int) -> Path:
        return self.split_dir / self.name(i) / CURRENT_NAME

    def future(self, i: int) -> Path:
        return self.split_dir / self.name(i) / FUTURE_NAME

    def instruction(self, i: int) -> str:
        return self._instructions[self._instr[i]]

    def horizon(self, i: int) -> int | None:
        h = int(self._horizon[i])
        return None if h == _NO_HORIZON else h

    def horizons(self) -> list[int]:
        """The distinct horizons of the split, sorted (pairs without one are not counted)."""
        return [int(h) for h in np.unique(self._horizon) if h != _NO_HORIZON]

    def without_horizon(self) -> list[int]:
        """Indices of the pairs whose prompt.json gives no horizon."""
        return np.flatnonzero(self._horizon == _NO_HORIZON).tolist()

    def prompt_source(self, i: int) -> Path:
        return self.split_dir / self.name(i) / PROMPT_NAME

    def format(self, i: int, template: str) -> str:
        """Pair i's prompt from the columns (no file read); an error names its prompt.json."""
        return format_prompt(template, self.instruction(i), self.horizon(i), source=self.prompt_source(i))

    def names(self) -> list[str]:
        return [n.decode() for n in self._names]

    @overload
    def __getitem__(self, i: int) -> Pair: ...
    @overload
    def __getitem__(self, i: slice) -> list[Pair]: ...
    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return _read_pair(self.split_dir / self.name(i))

    def __iter__(self) -> Iterator[Pair]:
        return (self[i] for i in range(len(self)))

    def task_counts(self) -> dict[str, int]:
        counts = np.bincount(self._task, minlength=len(self._tasks))
        return dict(sorted((t, int(c)) for t, c in zip(self._tasks, counts)))

    def __repr__(self) -> str:
        return f"PairSet({str(self.root)!r}, {self.split!r}: {len(self)} samples)"
