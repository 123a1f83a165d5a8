"""A run dir: resolved_config.yaml, metrics.jsonl, loss.png, checkpoints/, final/."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import yaml

from lftk import atomic
from lftk.config import Recipe, dump_recipe
from lftk.errors import LftkError
from lftk.runtime.layout import RUN_CHECKPOINTS, RUN_CONFIG, RUN_FINAL, RUN_METRICS

log = logging.getLogger(__name__)


class RunDir:
    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.config = self.root / RUN_CONFIG
        self.metrics = self.root / RUN_METRICS
        self.loss_png = self.root / "loss.png"
        self.checkpoints = self.root / RUN_CHECKPOINTS
        self.final = self.root / RUN_FINAL
        self.tensorboard = None  # lftk.eval.val.TensorBoardLog on rank 0 (a no-op without the package)

    def create(self, recipe: Recipe, resume: bool) -> None:
        """A fresh run refuses a dir that already holds one; --resume needs the same config
        (max_steps aside: extending a finished run is a resume too; `sampling`, which only chooses
        the defaults recorded once training ends; and output_dir, for a run dir moved or copied)."""
        text = dump_recipe(recipe)
        if self.config.exists():
            if not resume:
                raise LftkError(f"{self.root} already holds a run: pass --resume to continue it, or a new output_dir")
            old = yaml.safe_load(self.config.read_text())
            new = recipe.model_dump(mode="json")
            changed = sorted(k for k in set(old) | set(new) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))
            if changed:
                raise LftkError(
                    f"{self.config}: --resume with a different recipe (changed: {', '.join(changed)}); "
                    f"only {', '.join(RESUMABLE_CHANGES)} may change on resume"
                )
        elif resume:
            raise LftkError(f"{self.root}: nothing to resume (no resolved_config.yaml)")
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        atomic.write_text(self.config, text)

    def log_metrics(self, row: dict) -> None:
        with self.metrics.open("a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **row}) + "\n")
        if self.tensorboard is not None and "step" in row:
            self.tensorboard.log(row["step"], row)

    def read_metrics(self) -> list[dict]:
        """Every row; a torn last line (a run killed mid-write) is dropped with a WARNING, a bad line
        before the last is refused (that file was edited or damaged, not cut short)."""
        if not self.metrics.exists():
            return []
        lines = [line for line in self.metrics.read_text(errors="replace").splitlines() if line.strip()]
        rows = []
        for n, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                if n == len(lines):
                    log.warning("%s: dropping its torn last line %d (the run was stopped mid-write)", self.metrics, n)
                    break
                raise LftkError(f"{self.metrics}: line {n} is not a JSON object ({exc}); fix or remove that line") from exc
            rows.append(row)
        return rows

    def truncate_metrics(self, after_step: int) -> None:
        """On resume, drop rows logged after the checkpoint so the log has no duplicate steps."""
        rows = [r for r in self.read_metrics() if r.get("step", 0) <= after_step]
        atomic.write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in rows))

    def plot_loss(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.read_metrics()
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        if train:
            ax.plot(*zip(*train), label="train", lw=1)
        if val:
            ax.plot(*zip(*val), "o-", label="val", lw=1.5)
        ax.set_xlabel("step")
        ax.set_ylabel("diffusion loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.loss_png.with_suffix(".tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, self.loss_png)


# Recipe keys a resume may change: none alters a step (output_dir: a run dir moved or copied resumes where it is).
RESUMABLE_CHANGES = ("max_steps", "sampling", "output_dir")

