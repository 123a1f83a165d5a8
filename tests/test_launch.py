"""The multi-node launcher's arguments, the lost-peer error and the collective watchdog, on one machine
(the two-node runs themselves are the `multinode` tier: tests/test_multinode.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import subprocess_env

from lftk.errors import LftkError
from lftk.train.launch import Topology, read_status, record_failure

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("topo, says", [
    (Topology(nnodes=2), "--nnodes > 1 needs --master-addr"),
    (Topology(nnodes=2, node_rank=2, master_addr="10.0.0.1"), "--node-rank 2: must be in 0..1"),
    (Topology(master_port=70000), "--master-port 70000: not a TCP port"),
])
def test_a_wrong_topology_is_a_one_line_error(topo, says):
    with pytest.raises(LftkError, match=says.replace(".", r"\.").replace("+", r"\+")):
        topo.check()


def test_several_nodes_use_torchruns_static_rendezvous_at_node_0():
    args = Topology(nproc=4, nnodes=2, node_rank=1, master_addr="10.0.0.1").check().torchrun_args()
    assert args == ["--nproc_per_node=4", "--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1", "--master_port=29500"]
    assert not Topology().launches and Topology(nproc=1, nnodes=2, master_addr="h").launches


def test_the_cli_refuses_a_second_node_without_master_addr_before_loading_anything():
    res = subprocess.run([sys.executable, "-m", "lftk.cli", "train", "recipes/demo.yaml", "--nnodes", "2"], cwd=REPO,
                         env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == "error: --nnodes > 1 needs --master-addr: the address of node 0, reachable from every node"


def test_a_rank_tells_the_launcher_its_code_and_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("LFTK_RANK_STATUS_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "3")
    record_failure(2, "rank 3 of 4 lost contact with another rank")
    assert read_status(tmp_path) == {3: (2, "rank 3 of 4 lost contact with another rank")}


class _Setup:
    def __init__(self, root: Path, world: int):
        from lftk.train.rundir import RunDir

        self.run, self.rank, self.world = RunDir(root), 0, world


@pytest.mark.parametrize("exc, lost", [
    (RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [10.0.0.2]:4711: Connection reset "
                  "by peer. This is typically caused by a remote worker hanging"), "Read error [10.0.0.2]:4711: Connection reset by peer"),
    (RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 30000ms for recv operation to complete"),
     "Timed out waiting 30000ms for recv operation to complete"),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"), None),
    (ValueError("connection reset by peer"), None),
])
def test_only_backend_failures_become_the_lost_peer_error(tmp_path, exc, lost):
    from lftk.train.loop import lost_peer_error

    (tmp_path / "checkpoints" / "step0000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step0000004" / "COMPLETE").write_text("{}")
    err = lost_peer_error(exc, _Setup(tmp_path, world=2))
    if lost is None:
        assert err is None
        return
    assert str(err) == (f"rank 0 of 2 lost contact with another rank ({lost}); the newest complete checkpoint is "
                        f"{tmp_path / 'checkpoints' / 'step0000004'}: start every node again with --resume")
    assert lost_peer_error(exc, _Setup(tmp_path, world=1)) is None, "one rank has no peer to lose"


WATCHED = r'''
import sys, time
from lftk.train.watchdog import Watchdog
dog = Watchdog(float(sys.argv[1]), lambda what: f"stuck in {what}", poll_s=0.05)
with dog.watch("a quick step"):
    time.sleep(0.1)
print("quick step done", flush=True)
with dog.watch("the gradient all-reduce"):
    time.sleep(float(sys.argv[2]))
print("not reached", flush=True)
'''


def test_the_watchdog_ends_a_rank_stuck_past_the_timeout_with_exit_2():
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-c", WATCHED, "0.5", "30"], env=subprocess_env(), capture_output=True,
                         text=True, timeout=60)
    took = time.monotonic() - t0
    assert res.returncode == 2, res.stderr
    assert res.stdout.splitlines() == ["quick step done"]
    assert res.stderr.strip().splitlines()[-1] == "error: stuck in the gradient all-reduce"
    assert took < 20, f"took {took:.1f} s for a 0.5 s deadline"
