"""The FSDP2 backend (parallel.shard=fsdp) on the CPU (gloo): gradients and loss curves against
one process, the bytes each rank's shards hold, a rank whose experts get no token, resume to
and from the other backends at other layouts, and the refused combinations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fsdp_check import BASE

from xpar.checks import UserError
from xpar.export import consolidate
from xpar.model import MoETransformerLM
from xpar.parallel import ParallelConfig, check_layout
from xpar.parallel.parallelize import expert_parameter_names

from distributed import assert_all_ok, run_ranks
from jobs import assert_close, assert_same_tensors, build, train

CHECK = str(Path(__file__).parent / "fsdp_check.py")
# Micro-batches of 2 rows with the balancing loss per rank and micro-batch: the same loss at
# every layout (2 processes accumulate two micro-steps, 4 take one), so the curves can match
# one process's to float rounding.
RUN = [
    *BASE,
    "data.micro_batch_size=2",
    "parallel.reduce_aux_stats=false",
    "trainer.max_steps=10",
    "trainer.log_every=1",
    "trainer.eval_every=10",
    "trainer.save_every=5",
]
FSDP = ["parallel.shard=fsdp", "parallel.ep_size=2"]


def cli(tmp: Path, name: str, nproc: int, extra: list[str]) -> dict[int, float]:
    return train(tmp, name, nproc, [*RUN, *extra])


def last_json(results) -> list[dict]:
    assert_all_ok(results)
    return [json.loads(r.stdout.strip().splitlines()[-1]) for r in results]


def resave(checkpoint: Path, out: Path, nproc: int, layout: list[str]) -> dict:
    """The consolidated tensors of `checkpoint` resumed at `layout` and saved at once."""
    results = run_ranks([CHECK, "resave", str(out), str(checkpoint), *layout], nproc)
    last_json(results)
    return consolidate(out / "checkpoints").tensors


# ---- gradients, state bytes, idle experts ----------------------------------------------------


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_gradients_and_losses_match_one_process_and_each_rank_holds_its_share(tmp_path, world):
    """EP=2 on 2 processes, EP=2 x DP=2 on 4: top-k and two-level, with and without
    accumulation, HSDP with full recompute, CPU offload. Each rank holds its rows of every
    tensor: ceil(rows / ranks) per rank, the last rank fewer (FSDP pads its storage, not the
    tensor), so the shares add up to the whole model exactly, and no rank holds more than one
    row per tensor above 1 / ranks."""
    out = last_json(run_ranks([CHECK, "grads", str(tmp_path), "parallel.ep_size=2"], world))
    for case, c in out[0]["cases"].items():  # rank 0 ran one process beside its own
        assert c["grad_rel_diff"]["expert"] < 1e-5 and c["grad_rel_diff"]["dense"] < 1e-5, c
        assert c["norm_rel_diff"] < 1e-5 and c["loss_rel_diff"] < 1e-5, (case, c)  # 10 steps
    totals: dict[str, dict[str, dict[str, int]]] = {}
    for r in out:
        for case, c in r["cases"].items():
            assert c["bytes"] == c["expected"], (case, r["rank"])
            t = totals.setdefault(case, {"dense": {}, "expert": {}})
            t["dense"][r["rank"]] = c["bytes"]["params"]["dense"]
            t["expert"][r["rank"]] = c["bytes"]["params"]["expert"]
    accum = {case: c["accum"] for case, c in out[0]["cases"].items()}
    assert accum["topk"] == 1 and accum["topk_accum"] == 8 // world
    model = MoETransformerLM(build([*BASE, "moe=topk", "run_name=m"]).model_config())
    named = dict(model.named_parameters())
    experts = set(expert_parameter_names(model))
    dense = 4 * sum(p.numel() for n, p in named.items() if n not in experts)
    expert = 4 * sum(named[n].numel() for n in experts)
    t = totals["topk"]
    assert sum(t["dense"].values()) == dense and sum(t["expert"].values()) == expert
    # 1 / world of the dense part, up to a row of each tensor; of the experts 1 / (ep_size x
    # edp), which is 1 / world too, exactly: their rows divide evenly here.
    one_row_each = 4 * sum(p.numel() // p.shape[0] for n, p in named.items() if n not in experts)
    for rank in range(world):
        assert 0 <= t["dense"][rank] - dense / world <= one_row_each
        assert t["expert"][rank] == expert / world


@pytest.mark.distributed
def test_a_rank_whose_experts_get_no_token_does_not_hang(tmp_path):
    out = last_json(run_ranks([CHECK, "skewed", str(tmp_path)], 2, timeout=240))
    for r in out:
        X = r["experts_per_rank"]
        for load_LE in r["load"]:  # every token went to EP rank 0's experts
            assert all(sum(row[X:]) == 0 and sum(row[:X]) > 0.99 for row in load_LE), load_LE
        assert r["losses"]["fsdp"] == pytest.approx(r["losses"]["ref"], rel=1e-5)


# ---- training and resume ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict[str, dict[int, float]]]:
    """The loss curves of one process and of FSDP layouts, their checkpoints at step 5."""
    tmp = tmp_path_factory.mktemp("fsdp")
    curves = {
        "one": cli(tmp, "one", 1, ["moe=two_level"]),
        "fsdp4": cli(tmp, "fsdp4", 4, [*FSDP, "moe=two_level"]),
        "zero2": cli(tmp, "zero2", 2, ["parallel.ep_size=2", "deepspeed=zero2", "moe=two_level"]),
    }
    return tmp, curves


@pytest.mark.distributed
def test_fsdp_curves_match_one_process(runs):
    _, curves = runs
    assert_close(curves["one"], curves["fsdp4"])
    assert_close(curves["one"], curves["zero2"], rtol=1e-4)  # the source of a resume below


@pytest.mark.distributed
def test_fsdp_resumes_exactly_and_into_the_other_backends(runs):
    tmp, curves = runs
    source = tmp / "runs" / "fsdp4" / "checkpoints" / "step_5"
    after = {s: v for s, v in curves["fsdp4"].items() if s > 5}
    resume = f"trainer.resume={source}"
    zero = ["moe=two_level", "parallel.ep_size=2", "deepspeed=zero2"]
    # Same layout: bitwise the same curve.
    assert cli(tmp, "again", 4, [*FSDP, "moe=two_level", resume]) == after
    # Another backend and layout: one process, and ZeRO-2 at EP=2 on 2 processes.
    assert_close(after, cli(tmp, "plain1", 1, ["moe=two_level", resume]))
    assert_close(after, cli(tmp, "zero2_from_fsdp", 2, [*zero, resume]))
    # Loading and saving again at once keeps every weight and moment bit for bit.
    whole = consolidate(source).tensors
    assert_same_tensors(resave(source, tmp / "re1", 1, ["moe=two_level"]), whole)
    assert_same_tensors(resave(source, tmp / "re2", 2, zero), whole)


@pytest.mark.distributed
def test_zero2_resumes_into_fsdp(runs):
    tmp, curves = runs
    source = tmp / "runs" / "zero2" / "checkpoints" / "step_5"
    after = {s: v for s, v in curves["zero2"].items() if s > 5}
    got = cli(tmp, "fsdp_from_zero2", 4, [*FSDP, "moe=two_level", f"trainer.resume={source}"])
    assert_close(after, got)
    fsdp = [*FSDP, "moe=two_level"]
    assert_same_tensors(resave(source, tmp / "re4", 4, fsdp), consolidate(source).tensors)


# ---- refused ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["parallel.shard=fsdp", "deepspeed=zero2"], "deepspeed=zero2"),
        (["parallel.shard=fsdp", "trainer.precision=fp16"], "trainer.precision=fp16"),
        (["parallel.shard_size=2"], "parallel.shard_size=2"),
        (["parallel.offload=true"], "parallel.offload=True"),
        (["parallel.shard=zero3"], "parallel.shard='zero3'"),
        (["parallel.shard=fsdp", "parallel.shard_size=0"], "parallel.shard_size=0"),
    ],
)
def test_bad_fsdp_settings_are_one_line_errors(overrides, named):
    with pytest.raises((UserError, ValueError)) as err:
        build([*RUN, *overrides, "run_name=bad"])
    assert named in str(err.value) and "\n" not in str(err.value)


def test_a_shard_size_that_does_not_divide_the_world_is_refused_before_any_collective():
    # check_layout runs on every rank before the process group (test_parallel_train.py
    # launches a bad layout to show each rank's one line and no hang).
    with pytest.raises(UserError, match=r"parallel\.shard_size=3 does not divide the world size 2"):
        check_layout(ParallelConfig(shard="fsdp", shard_size=3), None, 2)
