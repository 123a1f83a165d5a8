"""`lftk train --nproc N`: start N local ranks with torchrun (each rank re-enters `lftk train`)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from lftk.train.engine import _free_port

log = logging.getLogger(__name__)


def launch_local(nproc: int, train_args: list[str]) -> int:
    """Run torchrun on this machine; returns its exit code. Multi-node: use the deepspeed launcher (README)."""
    # torchrun sets each rank's own; stale ones from the parent would point ranks at a busy port.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    # Each rank gets an equal share of the cores, else N ranks oversubscribe the CPU (OMP_NUM_THREADS=1 for 2 ranks on 2 cores).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc}", f"--master_port={_free_port()}",
        "-m", "lftk.cli", "train", *train_args,
    ]
    log.info("launching %d local ranks: %s", nproc, " ".join(cmd))
    return subprocess.call(cmd, env=env)
