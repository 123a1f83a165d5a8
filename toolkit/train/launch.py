"""`lftk train --nproc M [--nnodes N --node-rank K --master-addr HOST]`: start this node's ranks with
torchrun (each rank re-enters `lftk train`).

One node: M local ranks on a free port. Several nodes: the same command on every node with its own
`--node-rank`; node 0 hosts the rendezvous at HOST:PORT (torchrun's static rendezvous, what plain
clusters without ssh between nodes use). Ranks are numbered node by node: node K holds global ranks
K*M .. K*M+M-1.

A rank that stops on an LftkError (a lost peer, a bad file) writes its exit code and message to a
status dir the launcher made; torchrun itself only says "a child failed" (exit 1), so the launcher
repeats the rank's one-line reason last and exits with the rank's code (2).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lftk.errors import LftkError

log = logging.getLogger(__name__)

STATUS_ENV = "LFTK_RANK_STATUS_DIR"
DEFAULT_MASTER_PORT = 29500  # torchrun's


@dataclass(frozen=True)
class Topology:
    """Where this node's ranks sit among all of them."""

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None

    def check(self) -> "Topology":
        if self.nnodes > 1 and not self.master_addr:
            raise LftkError("--nnodes > 1 needs --master-addr: the address of node 0, reachable from every node")
        if not 0 <= self.node_rank < self.nnodes:
            raise LftkError(f"--node-rank {self.node_rank}: must be in 0..{self.nnodes - 1} for --nnodes {self.nnodes}")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise LftkError(f"--master-port {self.master_port}: not a TCP port")
        return self

    @property
    def launches(self) -> bool:
        """Whether a launcher is needed (more than one rank in all)."""
        return self.nproc * self.nnodes > 1

    def torchrun_args(self) -> list[str]:
        if self.nnodes == 1:
            from lftk.train.engine import _free_port

            return [f"--nproc_per_node={self.nproc}", f"--master_port={self.master_port or _free_port()}"]
        return [
            f"--nproc_per_node={self.nproc}", f"--nnodes={self.nnodes}", f"--node_rank={self.node_rank}",
            f"--master_addr={self.master_addr}", f"--master_port={self.master_port or DEFAULT_MASTER_PORT}",
        ]


def launch(topo: Topology, train_args: list[str]) -> int:
    """Run torchrun for this node's ranks; returns the exit code lftk should end with."""
    # torchrun sets each rank's own; stale ones from the parent would point ranks at a busy port.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    # Each rank gets an equal share of the cores, else M ranks oversubscribe the CPU (OMP_NUM_THREADS=1 for 2 ranks on 2 cores).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // topo.nproc)))
    status = Path(tempfile.mkdtemp(prefix="lftk-ranks-"))
    env[STATUS_ENV] = str(status)
    cmd = [sys.executable, "-m", "torch.distributed.run", *topo.torchrun_args(), "-m", "lftk.cli", "train", *train_args]
    where = f"node {topo.node_rank} of {topo.nnodes}, " if topo.nnodes > 1 else ""
    log.info("launching %s%d local rank(s): %s", where, topo.nproc, " ".join(cmd))
    try:
        code = subprocess.call(cmd, env=env)
        if code == 0:
            return 0
        failed = read_status(status)
        if failed:
            rank, (rank_code, message) = min(failed.items())
            who = "" if message.startswith(f"rank {rank} ") else f"rank {rank}: "
            print(f"error: {who}{message}", file=sys.stderr)
            return rank_code
        return code
    finally:
        shutil.rmtree(status, ignore_errors=True)


def record_failure(code: int, message: str) -> None:
    """Called by a launched rank that exits on an LftkError: its code and first line, for the launcher."""
    status = os.environ.get(STATUS_ENV)
    if not status or "RANK" not in os.environ:
        return
    try:
        Path(status, f"rank{int(os.environ['RANK'])}.json").write_text(json.dumps({"code": code, "message": message}))
    except OSError:  # the launcher's dir is gone (it was killed): nothing to tell it
        pass


def read_status(status: Path) -> dict[int, tuple[int, str]]:
    out = {}
    for path in status.glob("rank*.json"):
        try:
            data = json.loads(path.read_text())
            out[int(path.stem[4:])] = (int(data["code"]), str(data["message"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out
