"""Sharded checkpoints on 4 CPU processes (gloo): what a rank holds while it saves and loads,
re-sharding to other layouts with the same weights and AdamW moments, and SIGKILLs at random
points of a save."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from xpar.export import consolidate
from xpar.persist import checkpoint as ckpt

from distributed import REPO, assert_all_ok, free_port, run_ranks

pytestmark = pytest.mark.distributed

WORKER = str(Path(__file__).parent / "sharded_check.py")
MiB = 1 << 20
# What a save or a load may hold beyond the rank's training state: DCP's safetensors writer
# builds one file in memory (a layer's share of this rank's state) and serialises it once
# more; a load maps one file and reads one piece of it at a time. Plus what Python and DCP
# allocate on the way.
SLACK = 4 * MiB
# glibc keeps freed heap memory resident and serves later allocations from it, which would hide
# what a save allocates; with a fixed mmap threshold every large block is returned when freed,
# so the resident high-water mark follows the live bytes.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def measured(args: list[str], world: int) -> list:
    with pytest.MonkeyPatch.context() as mp:
        for key, value in MALLOC.items():
            mp.setenv(key, value)
        return run_ranks(args, world=world, timeout=400)


def results_of(ranks) -> list:
    """Each rank's last line of output, as JSON."""
    assert_all_ok(ranks)
    return [json.loads(r.stdout.strip().splitlines()[-1]) for r in ranks]


def results(ranks) -> list[dict]:
    """The worker's reports, losses keyed by step."""
    out = results_of(ranks)
    for r in out:
        r["losses"] = {int(k): v for k, v in r["losses"].items()}
    return out


def assert_bounded(peak: int, r: dict, largest_file: int) -> None:
    """A save's or load's peak stays within the stated bound (twice the largest file a rank
    writes, plus SLACK), which is far below what the other ranks' experts would take, so that
    gathering them would fail this."""
    bound = 2 * largest_file + SLACK
    assert peak <= bound, (peak / MiB, bound / MiB)
    assert bound < r["other_ranks_experts"], (bound / MiB, r["other_ranks_experts"] / MiB)


def assert_same_consolidated(a: Path, b: Path) -> None:
    ta, tb = consolidate(a).tensors, consolidate(b).tensors
    assert ta.keys() == tb.keys() and any(k.startswith("optim/exp_avg_sq/") for k in ta)
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def assert_losses(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b) == list(range(6, 11))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> list[dict]:
    """EP=4 on 4 ranks: step_5, and the losses of steps 6-10 of the run that never stopped."""
    out = tmp_path_factory.mktemp("ep4") / "run"
    return results(measured([WORKER, "source", str(out)], world=4))


def largest_file(source: list[dict]) -> int:
    return max(r["largest_file"] for r in source)


def test_ep4_save_and_load_hold_one_layer_not_the_other_ranks_experts(source):
    for r in source:
        assert_bounded(r["save_peak"], r, r["largest_file"])
        assert_bounded(r["load_peak"], r, largest_file(source))
    assert len({json.dumps(r["losses"]) for r in source}) == 1  # every rank saw the same loss


@pytest.mark.parametrize("world,ep", [(2, 2), (1, 1), (4, 2)], ids=["EP2", "one", "EP2xDP2"])
def test_resharded_resume_keeps_weights_moments_and_losses(tmp_path, source, world, ep):
    step5 = Path(source[0]["path"])
    args = [WORKER, "resume", str(step5), str(ep), str(tmp_path / "run")]
    out = results(measured(args, world=world))
    assert_same_consolidated(step5, Path(out[0]["path"]))
    assert_losses(source[0]["losses"], out[0]["losses"])
    if ep > 1:  # (one process holds every expert: nothing to compare with)
        for r in out:
            assert_bounded(r["load_peak"], r, largest_file(source))
            assert_bounded(r["save_peak"], r, r["largest_file"])


FAILING_RANK = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import xpar.persist.artefact as artefact
from sharded_check import make, train
trainer = make(Path({out!r}), 2)
train(trainer, 1)
trainer.save()
if trainer.mesh.layout.rank == 1:  # rank 1's disk is full when it writes its RNG states
    def full(path, data):
        raise OSError("No space left on device")
    artefact.write_bytes = full
train(trainer, 1)
try:
    trainer.save()
except Exception as e:
    print(json.dumps([type(e).__name__, str(e)]))
"""


def test_a_rank_that_fails_a_save_fails_it_on_every_rank_without_a_hang(tmp_path):
    code = FAILING_RANK.format(tests=str(REPO / "tests"), out=str(tmp_path / "run"))
    out = results_of(run_ranks(["-c", code], world=2, timeout=120))
    assert out[1] == ["OSError", "No space left on device"]
    assert out[0][0] == "RuntimeError" and "rank 1: OSError: No space left" in out[0][1]
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_1"]  # no step_2, no temp dir
    consolidate(root / "step_1")


KILLED_SAVES = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from sharded_check import make, train
trainer = make(Path({out!r}), 2)
train(trainer, 1)
while True:  # save after every step; the test kills the job at a random moment
    train(trainer, 1)
    trainer.save()
    print(trainer.step, flush=True)
"""


def test_sigkill_at_random_points_of_a_sharded_save_never_leaves_a_bad_newest(tmp_path):
    """Kill both ranks of an EP=2 job at random moments (saves take most of each step);
    whatever the newest complete checkpoint is, it loads; then resume from it."""
    rng = random.Random(0)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    port = free_port()
    for attempt in range(4):
        procs = []
        for rank in range(2):
            rank_env = {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port + attempt)}
            rank_env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
            code = KILLED_SAVES.format(tests=str(REPO / "tests"), out=str(out / str(attempt)))
            log = open(tmp_path / f"rank{rank}-{attempt}.log", "w")  # noqa: SIM115
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", code],
                    env=rank_env,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                    start_new_session=True,
                )
            )
        first = procs[0].stdout.readline()  # the first save is complete
        assert first.strip(), (tmp_path / f"rank0-{attempt}.log").read_text()[-2000:]
        time.sleep(rng.uniform(0.0, 2.0))
        victim = rng.choice([procs, procs[:1], procs[1:]])  # both ranks, or one
        for p in victim:
            os.killpg(p.pid, signal.SIGKILL)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        root = out / str(attempt) / "checkpoints"
        newest = ckpt.latest_checkpoint(root)
        assert newest is not None
        consolidate(newest)  # verifies every file and reads every tensor
    # A resume from the last attempt's newest checkpoint goes on.
    newest = ckpt.latest_checkpoint(out / "3" / "checkpoints")
    args = [WORKER, "resume", str(newest), "2", str(tmp_path / "again")]
    results(run_ranks(args, world=2, timeout=300))
