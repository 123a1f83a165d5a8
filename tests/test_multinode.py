"""Two "nodes" on one machine: two network namespaces joined by a veth pair, each running
`lftk train --nnodes 2 --node-rank K --master-addr NODE0` as a user types it on two hosts.

Tier `multinode` (`make test-multinode`): it needs root (ip netns); elsewhere it skips with the
reason. The namespaces and their veth pair exist only while the tier runs. Every case prints its
time and the weight difference it measured.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env
from safetensors.torch import load_file

pytestmark = pytest.mark.multinode

REPO = Path(__file__).resolve().parent.parent
UNET = "final/unet/diffusion_pytorch_model.safetensors"
NET = "10.231.77"  # a /24 used only inside the two namespaces
TIMEOUT_S = 30  # train.dist_timeout_s for these runs
STEPS = 40  # long enough (seconds) that a kill after the first checkpoint lands mid-run


def _sh(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


class Nodes:
    """ns0 (node 0, NET.1) and ns1 (node 1, NET.2), each with loopback and one end of a veth pair."""

    def __init__(self):
        tag = f"{os.getpid() % 100000}"
        self.ns = [f"lftk-n0-{tag}", f"lftk-n1-{tag}"]
        self.dev = [f"lftk0-{tag}", f"lftk1-{tag}"]
        self.addr = [f"{NET}.1", f"{NET}.2"]

    def create(self) -> str | None:
        """None when both namespaces are up and reach each other; else why not."""
        if shutil.which("ip") is None:
            return "no `ip` command (iproute2)"
        if os.geteuid() != 0:
            return "network namespaces need root"
        for ns in self.ns:
            res = _sh("ip", "netns", "add", ns)
            if res.returncode:
                return f"ip netns add {ns}: {res.stderr.strip()}"
        steps = [("ip", "link", "add", self.dev[0], "type", "veth", "peer", "name", self.dev[1])]
        for i in (0, 1):
            steps += [
                ("ip", "link", "set", self.dev[i], "netns", self.ns[i]),
                ("ip", "-n", self.ns[i], "addr", "add", f"{self.addr[i]}/24", "dev", self.dev[i]),
                ("ip", "-n", self.ns[i], "link", "set", self.dev[i], "up"),
                ("ip", "-n", self.ns[i], "link", "set", "lo", "up"),
            ]
        for cmd in steps:
            res = _sh(*cmd)
            if res.returncode:
                return f"{' '.join(cmd)}: {res.stderr.strip()}"
        ping = _sh("ip", "netns", "exec", self.ns[0], sys.executable, "-c",
                   f"import socket; s = socket.socket(); s.settimeout(3); s.connect_ex(('{self.addr[1]}', 9)); print('ok')")
        return None if ping.returncode == 0 else f"no route between the namespaces: {ping.stderr.strip()}"

    def delete(self) -> None:
        for ns in self.ns:
            _sh("ip", "netns", "del", ns)  # takes its end of the veth pair with it

    def kill(self, node: int, sig: int = signal.SIGKILL) -> None:
        """`sig` to every process in the node's namespace."""
        pids = _sh("ip", "netns", "pids", self.ns[node]).stdout.split()
        assert pids, f"no process runs in {self.ns[node]}"
        for pid in pids:
            try:
                os.kill(int(pid), sig)
            except ProcessLookupError:
                pass

    def start(self, node: int, run: Path, pairs: Path, base: Path, port: int, *extra: str, nnodes: int = 2,
              nproc: int = 1, audit: Path | None = None) -> subprocess.Popen:
        cmd = ["ip", "netns", "exec", self.ns[node], sys.executable, "-m", "lftk.cli", "train",
               *_recipe(run, pairs, base), *extra, "--nproc", str(nproc)]
        if nnodes > 1:
            cmd += ["--nnodes", str(nnodes), "--node-rank", str(node), "--master-addr", self.addr[0],
                    "--master-port", str(port)]
        env = subprocess_env(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=self.dev[node])
        if audit is not None:  # record this node's writes (sitecustomize below)
            env.update(PYTHONPATH=f"{audit.parent}{os.pathsep}{env.get('PYTHONPATH', '')}", LFTK_AUDIT=str(audit),
                       LFTK_AUDIT_ROOT=str(run))
        log = open(run.parent / f"{run.name}.node{node}.log", "a")
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _recipe(run: Path, pairs: Path, base: Path) -> list[str]:
    return ["recipes/demo.yaml", f"output_dir={run}", f"data.path={pairs}", f"model.base={base}", f"max_steps={STEPS}",
            "train.batch_size=2", "train.checkpoint_every=4", "train.warmup_steps=0", "train.val_samples=0",
            "train.lr=2e-3", "train.conditioning_dropout=0.3", f"train.dist_timeout_s={TIMEOUT_S}",
            "sampling.guidance=7.5", "sampling.image_guidance=1.5"]


# Loaded by the audited node's Python (PYTHONPATH): every file it opens for writing, and every
# directory it makes, renames or removes, under the run dir, one line each in LFTK_AUDIT.
SITECUSTOMIZE = r'''
import os, sys
_log, _root = os.environ.get("LFTK_AUDIT"), os.environ.get("LFTK_AUDIT_ROOT")
if _log and _root and "RANK" in os.environ:
    _root = os.path.realpath(_root)
    def _hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            mode = args[1] if len(args) > 1 and isinstance(args[1], str) else "r"
            if not any(c in mode for c in "wax+"):
                return
        elif event not in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree"):
            return
        try:
            path = os.path.realpath(os.fsdecode(args[0]))
        except Exception:
            return
        if path.startswith(_root):
            with open(_log + "." + os.environ["RANK"], "a", opener=lambda p, f: os.open(p, f, 0o644)) as fh:
                fh.write(event + " " + os.path.relpath(path, _root) + "\n")
    sys.addaudithook(_hook)
'''


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            codes.append(p.wait())
    return codes


def _log(run: Path, node: int) -> str:
    path = run.parent / f"{run.name}.node{node}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def _until_a_complete_checkpoint(run: Path, node0: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until the run has a complete checkpoint (node 0 still running), so a fault lands mid-run."""
    from lftk.train.checkpoint import complete_tags

    deadline = time.monotonic() + timeout
    while not (run / "checkpoints").is_dir() or not complete_tags(run / "checkpoints"):
        assert time.monotonic() < deadline and node0.poll() is None, _log(run, 0)[-3000:]
        time.sleep(0.1)


def _assert_node0_stopped_cleanly(run: Path, code0: int, took: float) -> None:
    """Node 0 ended with exit 2 within the timeout + 60 s, its last line naming the lost peer and --resume."""
    out = _log(run, 0)
    last = [line for line in out.splitlines() if line.strip()][-1]
    assert code0 == 2, out[-3000:]
    assert took <= TIMEOUT_S + 60
    assert last.startswith("error: rank 0") and "lost contact" in last and "--resume" in last, last


def _flat(path: Path) -> torch.Tensor:
    sd = load_file(path)
    return torch.cat([sd[k].flatten() for k in sorted(sd)])


def _report(what: str, seconds: float, diff: float | None = None) -> None:
    figure = "" if diff is None else f"  max |weight difference| {diff:.3g}"
    print(f"\n[multinode] {what}: {seconds:.1f} s{figure}", file=sys.__stdout__, flush=True)


@pytest.fixture(scope="module")
def nodes():
    n = Nodes()
    why = n.create()
    if why is not None:
        n.delete()
        pytest.skip(f"two network namespaces cannot be made here: {why}")
    yield n
    n.delete()


@pytest.fixture(scope="module")
def two_node_run(nodes, tiny_pairs_dir, tiny_pipeline_dir, tmp_path_factory):
    """The reference: 2 nodes x 1 rank, uninterrupted, node 1's writes audited."""
    root = tmp_path_factory.mktemp("multinode")
    (root / "audit").mkdir()
    (root / "audit" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    run = root / "two-nodes"
    t0 = time.monotonic()
    procs = [nodes.start(k, run, tiny_pairs_dir, tiny_pipeline_dir, 29641, audit=root / "audit" / f"node{k}")
             for k in (0, 1)]
    codes = _wait(procs, 600)
    assert codes == [0, 0], f"exit codes {codes}\nnode 0:\n{_log(run, 0)[-3000:]}\nnode 1:\n{_log(run, 1)[-3000:]}"
    _report("2 nodes x 1 rank", time.monotonic() - t0)
    return run, root


def test_two_nodes_equal_one_node_with_two_ranks_and_one_rank_with_double_batch(
    nodes, two_node_run, tiny_pairs_dir, tiny_pipeline_dir
):
    run, root = two_node_run
    ref = _flat(run / UNET)
    base = _flat(tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert (ref - base).norm() > 1e-2, "training barely moved the weights: the comparison would prove nothing"

    local = root / "one-node-two-ranks"
    t0 = time.monotonic()
    codes = _wait([nodes.start(0, local, tiny_pairs_dir, tiny_pipeline_dir, 0, nnodes=1, nproc=2)], 600)
    assert codes == [0], _log(local, 0)[-3000:]
    diff = (_flat(local / UNET) - ref).abs().max().item()
    _report("1 node x 2 ranks vs 2 nodes x 1 rank", time.monotonic() - t0, diff)
    assert diff == 0.0, "the same two ranks over a network gave other weights than over loopback"

    single = root / "one-rank-double-batch"
    t0 = time.monotonic()
    codes = _wait([nodes.start(0, single, tiny_pairs_dir, tiny_pipeline_dir, 0, "train.batch_size=4", nnodes=1)], 600)
    assert codes == [0], _log(single, 0)[-3000:]
    one = _flat(single / UNET)
    diff = (one - ref).abs().max().item()
    # Float sums in another order: Adam divides by sqrt(v), so single weights may differ in the last
    # bits' worth of lr; the update as a vector may not (the check of 2 local ranks, test_distributed).
    rel = ((one - base) - (ref - base)).norm().item() / (ref - base).norm().item()
    _report(f"1 rank x double batch vs 2 nodes x 1 rank (relative update difference {rel:.2e})", time.monotonic() - t0, diff)
    assert rel < 1e-2


def test_only_rank_0_writes_run_level_files_and_both_nodes_shards_land(two_node_run):
    run, root = two_node_run
    node1 = root / "audit" / "node1.1"
    assert node1.exists(), "node 1's writes were not recorded: the audit proves nothing"
    writes = node1.read_text().splitlines()
    outside = [w for w in writes if not w.split(" ", 1)[1].startswith("checkpoints")]
    assert not outside, f"rank 1 wrote run-level files: {outside}"
    node0 = (root / "audit" / "node0.0").read_text().splitlines()
    assert any("metrics.jsonl" in w for w in node0) and any("final" in w for w in node0)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in metrics if "loss" in m]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    tag = sorted((run / "checkpoints").glob("step*"))[-1]
    shards = sorted(p.name for p in tag.glob("*optim_states.pt"))
    assert len(shards) == 2 and "rank_0" in shards[0] and "rank_1" in shards[1], shards


def test_zero3_shards_of_both_nodes_consolidate_into_a_stock_pipeline(nodes, tiny_pairs_dir, tiny_pipeline_dir, tmp_path):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    run = tmp_path / "zero3"
    t0 = time.monotonic()
    procs = [nodes.start(k, run, tiny_pairs_dir, tiny_pipeline_dir, 29643, "train.zero_stage=3") for k in (0, 1)]
    codes = _wait(procs, 600)
    assert codes == [0, 0], f"{codes}\n{_log(run, 0)[-3000:]}\n{_log(run, 1)[-3000:]}"
    tag = sorted((run / "checkpoints").glob("step*"))[-1]
    assert len(list(tag.glob("*optim_states.pt"))) == 2
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(run / "final")
    base = _flat(tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors")
    moved = (torch.cat([p.detach().flatten() for _, p in sorted(pipe.unet.state_dict().items())]) - base).norm().item()
    _report(f"ZeRO-3 on 2 nodes, final/ loaded by diffusers (update norm {moved:.3g})", time.monotonic() - t0)
    assert moved > 1e-2


def test_a_lost_node_stops_node_0_with_exit_2_and_both_resume_to_the_uninterrupted_weights(
    nodes, two_node_run, tiny_pairs_dir, tiny_pipeline_dir, tmp_path
):
    from lftk.train.checkpoint import complete_tags, verify

    ref_run, _ = two_node_run
    run = tmp_path / "killed"
    procs = [nodes.start(k, run, tiny_pairs_dir, tiny_pipeline_dir, 29645) for k in (0, 1)]
    _until_a_complete_checkpoint(run, procs[0])
    nodes.kill(1)  # node 1 is gone, mid-run: every process in its namespace (torchrun's ranks run in their own sessions)
    killed = time.monotonic()
    (code0,) = _wait(procs[:1], TIMEOUT_S + 60)
    took = time.monotonic() - killed
    procs[1].wait()
    _report(f"node 1 SIGKILLed: node 0 exited {code0} after", took)
    _assert_node0_stopped_cleanly(run, code0, took)
    tags = complete_tags(run / "checkpoints")
    assert tags and verify(run / "checkpoints" / tags[-1]) is None, "the last complete checkpoint is damaged"
    assert not (run / "final").exists()

    t0 = time.monotonic()
    procs = [nodes.start(k, run, tiny_pairs_dir, tiny_pipeline_dir, 29647, "--resume") for k in (0, 1)]
    codes = _wait(procs, 600)
    assert codes == [0, 0], f"{codes}\n{_log(run, 0)[-3000:]}\n{_log(run, 1)[-3000:]}"
    diff = (_flat(run / UNET) - _flat(ref_run / UNET)).abs().max().item()
    _report(f"both nodes --resume from {tags[-1]}, vs uninterrupted", time.monotonic() - t0, diff)
    assert diff == 0.0


def test_a_hung_node_stops_node_0_after_the_configured_timeout(nodes, tiny_pairs_dir, tiny_pipeline_dir, tmp_path):
    run = tmp_path / "hung"
    procs = [nodes.start(k, run, tiny_pairs_dir, tiny_pipeline_dir, 29649) for k in (0, 1)]
    _until_a_complete_checkpoint(run, procs[0])
    nodes.kill(1, signal.SIGSTOP)  # node 1 hangs: alive, connected, silent
    stopped = time.monotonic()
    try:
        (code0,) = _wait(procs[:1], TIMEOUT_S + 60)
        took = time.monotonic() - stopped
    finally:
        nodes.kill(1)
        procs[1].wait()
    _report(f"node 1 SIGSTOPped (train.dist_timeout_s={TIMEOUT_S}): node 0 exited {code0} after", took)
    _assert_node0_stopped_cleanly(run, code0, took)
