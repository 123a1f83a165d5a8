"""Reading a pair dir: the samples of one split, as training and evaluation see them.

The listing is eager (every prompt.json is read up front) so that a broken sample fails at
start-up, naming its dir, rather than hours into a run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence, overload

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


def format_prompt(template: str, instruction: str) -> str:
    """The text the model is conditioned on; the same rule at training and evaluation time."""
    try:
        return template.format(instruction=instruction)
    except (KeyError, IndexError, ValueError) as exc:
        raise LftkError(f"prompt template {template!r}: only '{{instruction}}' may appear in braces ({exc})") from None


def read_summary(root: Path | str) -> dict:
    """pairs.json of a pair dir, or {} for pair dirs made elsewhere."""
    path = Path(root) / PAIRS_SUMMARY
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LftkError(f"{path}: not valid JSON ({exc})") from None


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
    try:
        prompt = json.loads((sample / PROMPT_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LftkError(f"{sample / PROMPT_NAME}: not valid JSON ({exc})") from None
    if not isinstance(prompt, dict) or not isinstance(prompt.get("instruction"), str):
        raise LftkError(f"{sample / PROMPT_NAME}: expected a JSON object with an 'instruction' string")
    return Pair(sample.name, sample / CURRENT_NAME, sample / FUTURE_NAME, prompt)


class PairSet(Sequence[Pair]):
    """The samples of `root/<split>`, sorted by name. A split dir that exists but is empty gives 0 samples."""

    def __init__(self, root: Path | str, split: str):
        self.root = Path(root)
        self.split = split
        split_dir = self.root / split
        if not self.root.is_dir():
            raise LftkError(f"{self.root}: pair dir not found")
        if not split_dir.is_dir():
            have = ", ".join(split_names(self.root)) or "none"
            raise LftkError(f"{split_dir}: no split '{split}' in {self.root} (splits found: {have})")
        dirs = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.pairs: list[Pair] = [_read_pair(d) for d in dirs]

    def __len__(self) -> int:
        return len(self.pairs)

    @overload
    def __getitem__(self, i: int) -> Pair: ...
    @overload
    def __getitem__(self, i: slice) -> list[Pair]: ...
    def __getitem__(self, i):
        return self.pairs[i]

    def __iter__(self) -> Iterator[Pair]:
        return iter(self.pairs)

    def task_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for p in self.pairs:
            counts[p.task] = counts.get(p.task, 0) + 1
        return dict(sorted(counts.items()))

    def __repr__(self) -> str:
        return f"PairSet({str(self.root)!r}, {self.split!r}: {len(self)} samples)"
