"""The simulator's tasks: the paper's three, by name, with the instruction each episode carries.

Pure data, importable without pybullet (CLI help lists these); the scripted motions that perform
them are in `scripts.py`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str
    instruction: str


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("block_hammer_beat", "beat the block with the hammer"),
        Task("block_handover", "handover the blocks"),
        Task("blocks_stack_easy", "stack blocks"),
    )
}
