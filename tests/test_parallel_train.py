"""The trainer under torchrun on the CPU (gloo): expert parallelism gives the single-process
loss curve, checkpoints cross EP sizes, and bad layouts fail fast on every rank."""

import json
from pathlib import Path

import pytest

from distributed import torchrun
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


def test_ep2_by_dp2_gives_the_single_process_loss_curve(tmp_path):
    ref = single(tmp_path, "one", [])
    assert_curves_match(ref, parallel(tmp_path, "ep2dp2", 4, ["parallel.ep_size=2"]))


def test_two_level_on_ranks_sends_each_token_once_per_rank(tmp_path):
    ref = single(tmp_path, "one", ["moe=two_level"])
    ep = parallel(tmp_path, "ep2", 2, ["moe=two_level", "parallel.ep_size=2"])
    assert_curves_match(ref, ep)
    tokens = 32 * 64 * 4  # batch x seq_len x MoE layers: each row at most once per rank
    for m in ep.values():
        assert tokens <= m["a2a_rows"] < m["a2a_pair_rows"] == 2 * tokens  # top_k=2 pairs
        assert m["a2a_saving"] == pytest.approx(1 - m["a2a_rows"] / m["a2a_pair_rows"])


def test_ep_checkpoints_resume_in_one_process_and_at_ep2(tmp_path):
    straight = parallel(tmp_path, "ep2", 2, ["parallel.ep_size=2"])
    ckpt = tmp_path / "runs/ep2/checkpoints/step_10"
    resumed = single(tmp_path, "one", [f"trainer.resume={ckpt}"])
    assert sorted(resumed) == list(range(11, 21))
    for step in resumed:
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-4)
    again = parallel(tmp_path, "again", 2, ["parallel.ep_size=2", f"trainer.resume={ckpt}"])
    for step in again:
        assert again[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-6)


def one_line_on_every_rank(proc, nproc: int, pattern: str) -> None:
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.splitlines() if x.startswith("xpar: error: ")]
    assert sorted(x.split("]")[0] for x in lines) == [
        f"xpar: error: [rank {r}" for r in range(nproc)
    ], proc.stderr[-3000:]
    assert all(pattern in x for x in lines), lines
    # The one traceback is torchrun's own report that its workers failed.
    assert proc.stderr.count("Traceback") <= 1 and "ChildFailedError" in proc.stderr


@pytest.mark.parametrize(
    "nproc,overrides,pattern",
    [
        (2, ["parallel.ep_size=4"], "parallel.ep_size=4 does not divide the world size 2"),
        (2, ["parallel.ep_size=2", "moe.num_experts=7"], "moe.num_experts=7 is not divisible"),
        (
            2,
            ["parallel.ep_size=2", "moe=two_level", "moe.num_experts=12", "moe.num_groups=3"],
            "moe.num_groups=3 does not map onto parallel.ep_size=2",
        ),
    ],
    ids=["world", "experts", "groups"],
)
def test_bad_layout_fails_on_every_rank_without_hanging(tmp_path, nproc, overrides, pattern):
    proc = torchrun(["trainer.device=cpu", *overrides], nproc, cwd=tmp_path, timeout=180)
    one_line_on_every_rank(proc, nproc, pattern)


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
