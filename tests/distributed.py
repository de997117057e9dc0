"""Run a script in several processes on the CPU (gloo), under a watchdog: a hang fails the test
instead of stalling CI."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A local TCP port nothing listens on (bound, then released): free for a server, and
    refusing a client's connection."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(
    args: list[str], world: int, timeout: float = 300, cwd: Path | None = None
) -> list[subprocess.CompletedProcess]:
    """Start `python ARGS` as ranks 0..world-1 of one job (the environment torchrun would set)
    and wait for all; on timeout kill them all and raise."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "PYTHONPATH": f"{REPO}:{REPO / 'tests'}",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, *args],
                env=env,
                cwd=cwd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )
    results, deadline = [], time.monotonic() + timeout
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(deadline - time.monotonic(), 1))
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
        raise AssertionError(f"{args} with {world} ranks hung for {timeout} s") from None
    return results


def assert_all_ok(results: list[subprocess.CompletedProcess]) -> None:
    for rank, r in enumerate(results):
        assert r.returncode == 0, f"rank {rank} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


def torchrun(
    args: list[str], nproc: int, cwd: Path, timeout: float = 600, monitor: float | None = None
) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node NPROC -m xpar.train ARGS` as a user runs it,
    killed with all its workers if it outlives `timeout`. `monitor` sets torchrun's
    --monitor-interval: it stops the other workers at its first check after one fails, so a
    test that wants every rank's own error gives the slower ranks that long to report it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    if monitor is not None:
        cmd += ["--monitor-interval", str(monitor)]
    cmd += ["--nproc_per_node", str(nproc), "-m", "xpar.train", *args]
    return run_group(cmd, env, cwd, timeout)


def run_group(cmd: list[str], env: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run `cmd` in a session of its own; if it outlives `timeout`, kill it with everything it
    started (torchrun's workers, a launch script's children) and fail."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"{cmd} hung for {timeout} s") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def one_line_on_every_rank(proc, nproc: int, pattern: str) -> None:
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.splitlines() if x.startswith("xpar: error: ")]
    assert sorted(x.split("]")[0] for x in lines) == [
        f"xpar: error: [rank {r}" for r in range(nproc)
    ], proc.stderr[-3000:]
    assert all(pattern in x for x in lines), lines
    # The one traceback is torchrun's own report that its workers failed.
    assert proc.stderr.count("Traceback") <= 1 and "ChildFailedError" in proc.stderr
