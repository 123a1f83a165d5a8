"""User-facing errors: the CLI turns these into exit code 2 with a one-line reason."""

from __future__ import annotations


class LftkError(Exception):
    """Bad input from the user (a file, a key, a flag). The message names what is wrong."""

    exit_code = 2


class ConfigError(LftkError):
    """Every problem found in a recipe, reported together."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{lines}")


class NotAvailableError(LftkError):
    """A feature needs something this machine or install lacks (GPU, TensorRT, an extra)."""
