"""DeepSpeed ZeRO-1/2 under expert parallelism on the CPU (gloo): the single-process loss
curve, ZeRO-0's expert gradients, partitioned optimizer state, exact resume, re-sharding to
other EP sizes and to one process, the consolidated export, and bad checkpoints."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from zero_check import BASE

from xpar.checks import UserError
from xpar.export import consolidate, export
from xpar.model import MoETransformerLM
from xpar.persist import read_model
from xpar.training.zero import deepspeed_config, optimizer_groups

from distributed import assert_all_ok, one_line_on_every_rank, run_ranks, torchrun
from jobs import FAST, assert_same_tensors, build, losses, run_cli, train
from jobs import assert_close as curves_close

STEPS = ["trainer.max_steps=10", "trainer.log_every=1", "trainer.eval_every=10"]
RUN = [*BASE, *STEPS, "trainer.save_every=5"]


def cli(tmp: Path, name: str, nproc: int, extra: list[str]) -> dict[int, float]:
    return train(tmp, name, nproc, [*RUN, *extra])


def assert_close(a: dict, b: dict, rtol: float = 1e-4) -> None:
    curves_close(a, b, rtol)


def digest(path: Path) -> dict[str, str]:
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


# ---- config --------------------------------------------------------------------------------


def test_zero3_and_fp16_without_zero_are_refused_in_one_line():
    refused = "zero3 is not supported.*parallel.shard=fsdp.*deepspeed=zero2"
    with pytest.raises(UserError, match=refused):
        build(["deepspeed=zero3"])
    with pytest.raises(UserError, match="precision=fp16 needs loss scaling"):
        build(["trainer.precision=fp16"])


def test_deepspeed_config_follows_the_hydra_config():
    cfg = build(
        ["deepspeed=zero2", "trainer.precision=fp16", "optim.grad_clip=0.5", "optim.lr=3e-4"]
    )
    ds = deepspeed_config(cfg, micro=4, accum=2, world=4)
    assert ds["train_batch_size"] == 32 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0 and "bf16" not in ds
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == 3e-4
    bf16 = deepspeed_config(build(["deepspeed=zero1", "trainer.precision=bf16"]), 1, 1, 1)
    assert bf16["bf16"] == {"enabled": True} and "fp16" not in bf16
    # trainer.precision=auto is the trainer's: bf16 on a GPU (autocast and DeepSpeed agree)
    auto = build(["deepspeed=zero2", "trainer.precision=auto"])
    assert deepspeed_config(auto, 1, 1, 1, "cuda")["bf16"] == {"enabled": True}
    assert "bf16" not in deepspeed_config(auto, 1, 1, 1, "cpu")


def test_expert_banks_get_their_own_moe_group():
    model = MoETransformerLM(build([]).model_config())
    groups = optimizer_groups(model, 0.1, ep_size=2)
    expert = [g for g in groups if g.get("moe")]
    assert len(expert) == 1 and expert[0]["name"] == "ep_size_2"
    banks = {id(p) for n, p in model.named_parameters() if ".experts." in n}
    assert {id(p) for p in expert[0]["params"]} == banks
    dense = [p for g in groups if not g.get("moe") for p in g["params"]]
    assert len(dense) + len(banks) == len(list(model.parameters()))


# ---- training ------------------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.parametrize("stage", ["1", "2"])
def test_zero_matches_zero0_gradients_and_partitions_state(tmp_path, stage):
    results = run_ranks(
        [str(Path(__file__).parent / "zero_check.py"), "grads", stage, str(tmp_path)],
        world=4,
        timeout=420,
    )
    assert_all_ok(results)
    out = [json.loads(r.stdout.strip().splitlines()[-1]) for r in results]
    for r in out:
        assert r["experts_kept"], r  # not overwritten by rank 0's experts at start-up
        assert r["grad_rel_diff"]["expert"] < 1e-4 and r["grad_rel_diff"]["dense"] < 1e-4, r
        dense = r["bytes"]["dense"] / r["replicated"]["dense"]
        expert = r["bytes"]["expert"] / r["replicated"]["expert"]
        assert dense == pytest.approx(1 / r["world"], rel=0.02), r
        assert expert == pytest.approx(1 / r["edp"], rel=0.02), r
    by_ep = {r["ep_rank"]: r["expert_checksum"] for r in out}
    assert by_ep[0] != by_ep[1]  # EP ranks hold different experts


@pytest.mark.distributed
def test_frozen_experts_stay_each_rank_s_own(tmp_path):
    """With frozen experts DeepSpeed does not take the banks for experts (no expert group to
    partition) and broadcasts them from rank 0 when it starts: each rank must keep its own."""
    args = [str(Path(__file__).parent / "zero_check.py"), "kept", "router+head", str(tmp_path)]
    results = run_ranks(args, world=2, timeout=300)
    assert_all_ok(results)
    out = [json.loads(r.stdout.strip().splitlines()[-1]) for r in results]
    assert all(r["frozen"] and r["experts_kept"] for r in out), out


@pytest.mark.distributed
def test_zero_runs_match_one_process_and_resume(tmp_path):
    ref = cli(tmp_path, "one", 1, [])
    runs = {
        ("1", 2): ["parallel.ep_size=2", "deepspeed=zero1"],
        ("2", 2): ["parallel.ep_size=2", "deepspeed=zero2"],
        ("1", 4): ["parallel.ep_size=2", "deepspeed=zero1"],
        ("2", 4): ["parallel.ep_size=2", "deepspeed=zero2"],
    }
    for (stage, nproc), extra in runs.items():
        assert_close(ref, cli(tmp_path, f"z{stage}_{nproc}", nproc, extra))

    # Same world: DeepSpeed's own load, bit-exact.
    saved = tmp_path / "runs" / "z2_4" / "checkpoints" / "step_5"
    before = digest(saved)
    again = cli(tmp_path, "again", 4, [*runs[("2", 4)], f"trainer.resume={saved}"])
    full = losses(tmp_path / "runs" / "z2_4")
    assert again == {s: v for s, v in full.items() if s > 5}

    # Another layout: EP=4 (re-sharded experts and moments), and one process without ZeRO.
    ep4 = cli(
        tmp_path, "ep4", 4, ["parallel.ep_size=4", "deepspeed=zero2", f"trainer.resume={saved}"]
    )
    assert_close(again, ep4)
    assert_close(again, cli(tmp_path, "plain", 1, [f"trainer.resume={saved}"]))
    assert digest(saved) == before  # resuming reads only

    # Consolidated: the export loads into a single-process model and holds what the sharded
    # checkpoint holds; re-saving at EP=4 right after loading gives bitwise the same
    # consolidated weights and moments.
    exported = export(saved, tmp_path / "export")
    model = MoETransformerLM(build(BASE).model_config())
    model.load_state_dict(read_model(exported).state, strict=True)
    source = consolidate(saved).tensors
    assert_same_tensors(consolidate(exported).tensors, source)
    results = run_ranks(
        [
            str(Path(__file__).parent / "zero_check.py"),
            "resave",
            str(saved),
            str(tmp_path / "resaved"),
        ],
        world=4,
        timeout=300,
    )
    assert_all_ok(results)
    resaved = consolidate(tmp_path / "resaved" / "checkpoints").tensors
    assert_same_tensors(resaved, source)


# ---- bad checkpoints -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def zero_checkpoint(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("zero")
    cli(tmp, "src", 2, ["parallel.ep_size=2", "deepspeed=zero2", "trainer.max_steps=5"])
    return tmp / "runs" / "src" / "checkpoints" / "step_5"


def one_line_error(tmp: Path, args: list[str]) -> str:
    proc = run_cli([*RUN, *args], cwd=tmp)
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.splitlines() if x.startswith("xpar: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.mark.distributed
def test_a_checkpoint_of_another_model_names_both_values(tmp_path, zero_checkpoint):
    before = digest(zero_checkpoint)
    line = one_line_error(tmp_path, ["moe.num_experts=4", f"trainer.resume={zero_checkpoint}"])
    assert "moe.num_experts=8" in line and "moe.num_experts=4" in line
    line = one_line_error(tmp_path, ["model.d_model=96", f"trainer.resume={zero_checkpoint}"])
    assert "does not match the model" in line and "(64," in line and "96" in line
    assert digest(zero_checkpoint) == before


@pytest.mark.distributed
def test_a_missing_shard_is_named(tmp_path, zero_checkpoint):
    broken = tmp_path / "broken"
    shutil.copytree(zero_checkpoint, broken)
    shard = sorted((broken / "state").glob("shard-00002-*"))[0]  # one of rank 1's files
    shard.unlink()
    before = digest(broken)
    line = one_line_error(tmp_path, [f"trainer.resume={broken}"])
    assert f"state/{shard.name} is missing" in line
    assert digest(broken) == before


@pytest.mark.distributed
def test_an_ep_size_that_does_not_divide_the_experts_fails_on_every_rank(tmp_path, zero_checkpoint):
    args = [*RUN, "parallel.ep_size=3", "deepspeed=zero2", f"trainer.resume={zero_checkpoint}"]
    proc = torchrun([*args, "run_name=bad"], 3, cwd=tmp_path, timeout=120, monitor=15)
    one_line_on_every_rank(proc, 3, "ep_size=3")


@pytest.mark.distributed
def test_a_dense_model_trains_under_zero_in_one_process(tmp_path):
    args = [*FAST, "moe=dense", "trainer.max_steps=3", "trainer.log_every=1"]
    curves = {}
    for name, extra in (("dense", []), ("dense_z1", ["deepspeed=zero1"])):
        proc = run_cli([*args, *extra, f"run_name={name}"], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        curves[name] = losses(tmp_path / "runs" / name)
    assert_close(curves["dense"], curves["dense_z1"], rtol=1e-5)
    assert (tmp_path / "runs" / "dense_z1" / "checkpoints" / "step_3" / "meta.json").exists()
