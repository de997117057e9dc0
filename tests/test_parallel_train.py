"""The trainer under torchrun on the CPU (gloo): expert parallelism gives the single-process
loss curve, checkpoints cross EP sizes, and bad layouts fail fast on every rank."""

import json
from pathlib import Path

import pytest

from distributed import one_line_on_every_rank, torchrun
from jobs import run_cli

pytestmark = pytest.mark.distributed

STEPS = ["trainer.max_steps=20", "trainer.log_every=1", "trainer.eval_every=10"]
BASE = ["trainer.device=cpu", "trainer.progress=false", "trainer.save_every=10", *STEPS]


def losses(run_dir: Path) -> dict[int, dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x for x in lines if "loss" in x}


def assert_curves_match(a: dict, b: dict, rtol: float = 1e-4) -> None:
    assert sorted(a) == sorted(b) == list(range(1, 21))
    for step in a:
        for key in ("loss", "aux_loss"):
            assert b[step][key] == pytest.approx(a[step][key], rel=rtol), (step, key)


def single(tmp_path: Path, name: str, extra: list[str]) -> dict:
    proc = run_cli([*BASE, *extra, f"run_name={name}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return losses(tmp_path / "runs" / name)


def parallel(tmp_path: Path, name: str, nproc: int, extra: list[str]) -> dict:
    proc = torchrun([*BASE, *extra, f"run_name={name}"], nproc, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return losses(tmp_path / "runs" / name)


@pytest.mark.parametrize(
    "aux",
    [["moe.aux_loss_coef=0", "moe.z_loss_coef=0"], ["moe.aux_loss_coef=0.01"]],
    ids=["no_aux", "global_aux_stats"],
)
def test_ep2_gives_the_single_process_loss_curve(tmp_path, aux):
    ref = single(tmp_path, "one", aux)
    ep = parallel(tmp_path, "ep2", 2, ["parallel.ep_size=2", *aux])
    assert_curves_match(ref, ep)
    assert ep[1]["a2a_rows"] == ep[1]["a2a_pair_rows"] > 0  # flat routing: no dedup
    for m in ep.values():  # per-rank figures: each rank's share, gathered
        assert m["rank_a2a_rows_mean"] * 2 == m["a2a_rows"]
        assert m["rank_expert_slots_mean"] * 2 == m["a2a_pair_rows"]  # dropless: all computed
        for name in ("a2a_rows", "a2a_bytes", "expert_slots"):
            lo, mid, hi = (m[f"rank_{name}_{k}"] for k in ("min", "mean", "max"))
            assert 0 < lo <= mid <= hi


def test_ep2_by_dp2_gives_the_single_process_loss_curve(tmp_path):
    ref = single(tmp_path, "one", [])
    assert_curves_match(ref, parallel(tmp_path, "ep2dp2", 4, ["parallel.ep_size=2"]))


@pytest.fixture(scope="module")
def two_level_one_process(tmp_path_factory) -> dict:
    """The single-process two-level run the EP layouts are checked against (run once)."""
    return single(tmp_path_factory.mktemp("two_level"), "one", ["moe=two_level"])


def test_two_level_on_ranks_sends_each_token_once_per_rank(tmp_path, two_level_one_process):
    ref = two_level_one_process
    ep = parallel(tmp_path, "ep2", 2, ["moe=two_level", "parallel.ep_size=2"])
    assert_curves_match(ref, ep)
    tokens = 32 * 64 * 4  # batch x seq_len x MoE layers: each row at most once per rank
    for m in ep.values():
        assert tokens <= m["a2a_rows"] < m["a2a_pair_rows"] == 2 * tokens  # top_k=2 pairs
        assert m["a2a_saving"] == pytest.approx(1 - m["a2a_rows"] / m["a2a_pair_rows"])


def test_hierarchical_a2a_across_two_nodes_gives_the_single_process_curve(
    tmp_path, two_level_one_process
):
    """EP=4 as 2 nodes x 2 ranks: each token crosses to the other node at most once (its
    groups are on nodes), the curve is one process's, and the run resumes at EP=2 on one."""
    ref = two_level_one_process
    layout = ["moe=two_level", "parallel.ep_size=4", "parallel.ranks_per_node=2"]
    ep = parallel(tmp_path, "nodes", 4, layout)  # parallel.a2a: hierarchical by default
    assert_curves_match(ref, ep, rtol=1e-5)
    tokens = 32 * 64 * 4  # batch x seq_len x MoE layers, all ranks
    for m in ep.values():
        assert 0 < m["a2a_inter_rows"] <= tokens  # at most one row to the one other node
        assert m["a2a_inter_bytes"] == m["a2a_inter_rows"] * m["a2a_bytes"] // m["a2a_rows"]
        assert m["a2a_intra_rows"] > 0 and m["rank_a2a_inter_bytes_max"] > 0
    ckpt = tmp_path / "runs/nodes/checkpoints/step_10"
    again = parallel(tmp_path, "again", 2, ["moe=two_level", "parallel.ep_size=2",
                                            f"trainer.resume={ckpt}"])  # fmt: skip
    assert sorted(again) == list(range(11, 21))
    for step in again:
        assert again[step]["loss"] == pytest.approx(ep[step]["loss"], rel=1e-5)


def test_ep2_by_dp2_checkpoints_resume_in_one_process_and_at_ep2(tmp_path):
    straight = parallel(tmp_path, "ep2", 4, ["parallel.ep_size=2"])
    ckpt = tmp_path / "runs/ep2/checkpoints/step_10"
    resumed = single(tmp_path, "one", [f"trainer.resume={ckpt}"])
    assert sorted(resumed) == list(range(11, 21))
    for step in resumed:
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-4)
    again = parallel(tmp_path, "again", 2, ["parallel.ep_size=2", f"trainer.resume={ckpt}"])
    for step in again:
        assert again[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-6)


def test_bad_layout_fails_on_every_rank_without_hanging(tmp_path):
    """Each rank checks the layout before any collective (test_parallel_layer.py has every
    check's message; this is the launch: one line a rank, and no hang)."""
    args = ["trainer.device=cpu", "parallel.ep_size=2", "parallel.a2a=hierarchical"]
    proc = torchrun(args, 2, cwd=tmp_path, timeout=180, monitor=15)
    one_line_on_every_rank(proc, 2, "parallel.a2a=hierarchical needs each EP group to span")


def test_ep_size_2_in_one_process_is_a_one_line_error(tmp_path):
    proc = run_cli(["trainer.device=cpu", "parallel.ep_size=2"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "xpar: error: parallel.ep_size=2 does not divide the world size 1 (launch with torchrun "
        "--nproc_per_node N); use an ep_size that divides the number of processes"
    )


def test_evaluation_with_uneven_rank_shares_matches_one_process(tmp_path):
    # 33 validation sequences over 2 ranks in batches of 16 each: the last share of rank 1
    # is empty, and the loss is still the mean over every validation token.
    quick = ["trainer.max_steps=2", "trainer.eval_every=2", "data.num_val=33"]
    one = run_cli([*BASE, *quick, "run_name=one"], cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun([*BASE, *quick, "parallel.ep_size=2", "run_name=two"], 2, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]

    def val(name):
        lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["val_loss"] for x in lines if "val_loss" in x][-1]

    assert val("two") == pytest.approx(val("one"), rel=1e-5)


def test_a_streamed_corpus_resumes_exactly_on_two_ranks(tmp_path):
    # Each rank's stream position differs; the checkpoint keeps all of them.
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    lines = [" ".join(words[(i * 7 + j * 3) % 8] for j in range(5 + i % 7)) for i in range(3000)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    data = [
        "data=local_text",
        f"data.data_files=[{tmp_path}/corpus.txt]",
        "data.streaming=true",
        "data.max_val_sequences=8",
        "data.shuffle_buffer=16",
        "data.seq_len=32",
        "data.batch_size=8",
        "optim.schedule=constant",
    ]
    run = [*data, "trainer.device=cpu", "trainer.progress=false", "trainer.log_every=1"]
    run += ["trainer.eval_every=100", "parallel.ep_size=2"]
    straight = parallel(tmp_path, "a", 2, [*run, "trainer.max_steps=8"])
    parallel(tmp_path, "b", 2, [*run, "trainer.max_steps=4"])
    resumed = parallel(tmp_path, "b", 2, [*run, "trainer.max_steps=8", "trainer.resume=true"])
    assert sorted(resumed) == list(range(1, 9))  # steps 1-4 kept, 5-8 logged by the resume
    for step in range(5, 9):
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-6), step
    single_args = [*run, "parallel.ep_size=1", "trainer.max_steps=10", "trainer.resume=true"]
    one = run_cli([*single_args, "run_name=b"], tmp_path)
    assert one.returncode == 2 and "checkpoint's data position" in one.stderr  # per-rank streams


def test_sigterm_to_torchrun_stops_every_rank_at_one_step_and_saves(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from distributed import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    cmd += ["2", "-m", "xpar.train", *BASE, "trainer.max_steps=100000", "parallel.ep_size=2"]
    proc = subprocess.Popen(
        [*cmd, "run_name=sig"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    metrics = tmp_path / "runs/sig/metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline and proc.poll() is None, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    (ckpt,) = (tmp_path / "runs/sig/checkpoints").iterdir()
    assert f"stopped at step {ckpt.name.removeprefix('step_')} (signal SIGTERM)" in out
    again = parallel(tmp_path, "sig", 2, ["parallel.ep_size=2", "trainer.resume=true"])
    assert sorted(again) == list(range(1, 21))  # kept up to the stop, then the rest once
