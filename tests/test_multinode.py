"""launch/torchrun.sh on two "nodes": two network namespaces joined by a veth pair, two
processes each (EP=4 over both nodes: the hierarchical all-to-all), a c10d rendezvous on node
0's address and gloo over the veth.
The loss curve is the one-process curve; when node 1 dies (SIGKILL, its launcher and workers)
node 0 exits instead of hanging, and both nodes restarted resume the last checkpoint.

Both nodes run in this machine's file system, so they share the run dir, as nodes on a shared
file system do."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from xpar.training.records import read_records

from conftest import require_tool
from distributed import REPO
from jobs import FAST, run_cli

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SUBNET = "10.213.7"  # private to the test's namespaces: it cannot clash with the host's
STEPS = 12
SAVE_EVERY = 4
CONFIG = [
    *FAST,
    "data.seq_len=32",
    "trainer.log_every=1",
    f"trainer.max_steps={STEPS}",
    f"trainer.save_every={SAVE_EVERY}",
    f"trainer.eval_every={STEPS}",
    "trainer.eval_batches=2",
]
EP_ACROSS_NODES = "parallel.ep_size=4"  # 2 nodes x 2 ranks: parallel.a2a is hierarchical
RTOL = 1e-4  # the EP x DP parity tolerance of tests/test_parallel_train.py
# A SIGKILLed process's sockets are closed by its kernel, so node 0's ranks see their
# connections to node 1 drop and fail their collective at once, long before parallel.timeout_s
# (600 s: the bound for a peer that vanishes without a word, such as a node losing power);
# torchrun then stops its other worker and exits. 30 s is what tests/test_launch.py gives a
# SIGTERMed run to save and exit: a slow exit on this loaded machine fits in it, waiting for
# the collective timeout (or torchrun's 110 s SIGTERM grace) does not.
NODE0_EXIT_S = 30
RUN_TIMEOUT_S = 240  # one launch of both nodes; a hang fails the test instead of stalling CI


def unavailable(reason: str) -> NoReturn:
    """Skip on a developer's machine; fail in CI, which runs as root and sets
    XPAR_REQUIRE_TOOLS=1 (as conftest.require_tool does for missing programs)."""
    if os.environ.get("XPAR_REQUIRE_TOOLS"):
        pytest.fail(f"{reason}, and XPAR_REQUIRE_TOOLS=1 (CI) requires two network namespaces")
    pytest.skip(reason)


@dataclass
class Node:
    netns: str
    veth: str
    addr: str


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def kill_all_in(netns: str, timeout: float = 10) -> list[str]:
    """SIGKILL every process in `netns` (a node dying: its launcher and workers) until none
    is left; returns those still there after `timeout` s."""
    deadline = time.monotonic() + timeout
    while (pids := ip("netns", "pids", netns).stdout.split()) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.05)
    return pids


@contextlib.contextmanager
def two_nodes() -> Iterator[list[Node]]:
    """Two namespaces named for this run, joined by a veth pair, loopback up in each; on the
    way out every process in them is killed and both are deleted (the veth goes with them)."""
    if os.geteuid() != 0:
        unavailable("network namespaces need root")
    require_tool("ip")
    tag = f"{os.getpid() % 0x10000:04x}{secrets.token_hex(2)}"  # veth names: 15 chars at most
    nodes = [Node(f"xpar-mn-{tag}-{i}", f"xv{tag}{i}", f"{SUBNET}.{i + 1}") for i in (0, 1)]
    made = []
    try:
        for node in nodes:
            add = ip("netns", "add", node.netns)
            if add.returncode != 0:
                unavailable(f"`ip netns add` failed: {add.stderr.strip()}")
            made.append(node.netns)
        a, b = nodes
        steps = [("link", "add", a.veth, "netns", a.netns, "type", "veth", "peer", b.veth)]
        steps[0] += ("netns", b.netns)
        for node in nodes:
            steps += [
                ("-n", node.netns, "addr", "add", f"{node.addr}/24", "dev", node.veth),
                ("-n", node.netns, "link", "set", "lo", "up"),
                ("-n", node.netns, "link", "set", node.veth, "up"),
            ]
        for step in steps:
            done = ip(*step)
            if done.returncode != 0:
                unavailable(f"`ip {' '.join(step)}` failed: {done.stderr.strip()}")
        yield nodes
    finally:
        left = {netns: kill_all_in(netns) for netns in made}
        for netns in made:
            ip("netns", "del", netns)
        assert not any(left.values()), f"processes outlive SIGKILL: {left}"


def node_env(node: Node, rank: int, endpoint: str, rdzv_id: str, run: str) -> dict[str, str]:
    """A user's environment for launch/torchrun.sh on `node`."""
    skip = ("SLURM_", "TORCHELASTIC", "PET_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(skip)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env.update(
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        NNODES="2",
        NODE_RANK=str(rank),
        NPROC_PER_NODE="2",
        RDZV_ENDPOINT=endpoint,
        RDZV_ID=rdzv_id,
        RUN_NAME=run,
        GLOO_SOCKET_IFNAME=node.veth,
        # torchrun's --local-addr: node 0 would advertise its host name as the workers'
        # MASTER_ADDR, and this machine's name resolves to 127.0.0.1, which on node 1 is
        # node 1 itself.
        LOCAL_ADDR=node.addr,
    )
    return env


def free_port(netns: str) -> int:
    """A port free in `netns` (bound to 0 there)."""
    code = "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])"
    cmd = ["ip", "netns", "exec", netns, sys.executable, "-c", code]
    return int(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def start(nodes: list[Node], tmp_path: Path, label: str, args: list[str]) -> list:
    """launch/torchrun.sh on both nodes, each in its namespace, for run `two`, with a fresh
    rendezvous on node 0; node N logs to tmp_path/LABEL.N.log."""
    endpoint = f"{nodes[0].addr}:{free_port(nodes[0].netns)}"
    rdzv_id = f"{label}-{secrets.token_hex(4)}"
    procs = []
    for rank, node in enumerate(nodes):
        env = node_env(node, rank, endpoint, rdzv_id, "two")
        cmd = ["ip", "netns", "exec", node.netns, str(REPO / "launch/torchrun.sh"), *args]
        with (tmp_path / f"{label}.{rank}.log").open("w") as log:
            procs.append(
                subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
            )
    return procs


def wait_ok(procs: list, tmp_path: Path) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    for rank, proc in enumerate(procs):
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"node {rank} hung for {RUN_TIMEOUT_S} s") from None
        assert proc.returncode == 0, f"node {rank} failed:\n{logs(tmp_path)}"


def logs(tmp_path: Path) -> str:
    return "\n".join(
        f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("*.log"))
    )


def curve(run_dir: Path) -> dict[int, dict]:
    """Step -> training record, from the run's metrics.jsonl (a torn last line left out)."""
    return {r["step"]: r for r in read_records(run_dir / "metrics.jsonl") if "loss" in r}


def assert_close(curve: dict[int, dict], ref: dict[int, dict]) -> None:
    for step, record in curve.items():
        for key in ("loss", "aux_loss"):
            assert record[key] == pytest.approx(ref[step][key], rel=RTOL), (step, key)


def complete_checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name[5:]) for p in run_dir.glob("checkpoints/step_*/meta.json"))


def tx_bytes(node: Node) -> int:
    (link,) = json.loads(ip("-j", "-s", "-n", node.netns, "link", "show", "dev", node.veth).stdout)
    return link["stats64"]["tx"]["bytes"]


def test_two_nodes_train_like_one_process_and_resume_after_one_dies(tmp_path):
    with two_nodes() as nodes:
        ref = run_cli([*CONFIG, "run_name=one"], cwd=tmp_path, OMP_NUM_THREADS="1")
        assert ref.returncode == 0, ref.stderr[-3000:]
        one = curve(tmp_path / "runs/one")
        assert sorted(one) == list(range(1, STEPS + 1))

        # Both nodes train until node 1 dies a step or more past a checkpoint.
        run_dir = tmp_path / "runs/two"
        procs = start(nodes, tmp_path, "train", [*CONFIG, EP_ACROSS_NODES])
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (saved := complete_checkpoints(run_dir)) or max(curve(run_dir)) <= saved[-1]:
            assert time.monotonic() < deadline, f"no checkpoint written\n{logs(tmp_path)}"
            assert all(p.poll() is None for p in procs), f"a node stopped\n{logs(tmp_path)}"
            time.sleep(0.05)
        assert not kill_all_in(nodes[1].netns)
        killed = time.monotonic()
        while ip("netns", "pids", nodes[0].netns).stdout.split():
            took = time.monotonic() - killed
            assert took < NODE0_EXIT_S, f"node 0 runs {took:.0f} s on\n{logs(tmp_path)}"
            time.sleep(0.1)
        assert procs[0].wait() != 0 and procs[1].wait() == -signal.SIGKILL
        before = curve(run_dir)  # uninterrupted up to the kill
        newest = complete_checkpoints(run_dir)[-1]
        assert newest < max(before) < STEPS
        assert_close(before, one)
        # The EP group spans both nodes (2 ranks each, torchrun's LOCAL_WORLD_SIZE), so the
        # hierarchical all-to-all ran: rows crossed to the other node and inside each node.
        for record in before.values():
            assert record["a2a_inter_rows"] > 0 and record["a2a_intra_rows"] > 0, record
        # gloo took the veth it was given: node 1's gradients crossed it, some MB a step
        sent = tx_bytes(nodes[1])
        assert sent > max(before) * 1_000_000, sent

        # Both nodes restarted: they resume the newest complete checkpoint and go on exactly
        # as the run would have.
        args = [*CONFIG, EP_ACROSS_NODES, "trainer.resume=true"]
        wait_ok(start(nodes, tmp_path, "resume", args), tmp_path)
        log = (tmp_path / "resume.0.log").read_text()
        assert re.search(rf"resumed from \S+step_{newest} at step {newest}", log), log[-3000:]
        after = curve(run_dir)
        assert sorted(after) == list(range(1, STEPS + 1))
        for step in range(newest + 1, max(before) + 1):  # before the kill and after the restart
            assert after[step]["loss"] == before[step]["loss"], step
        assert_close(after, one)
    listed = ip("netns", "list").stdout
    assert all(node.netns not in listed for node in nodes)
