"""The planner (`python -m xpar.plan`): its model-state bytes equal what a real run's tensors
hold, its all-to-all rows equal xpar's own estimate on uniformly random routing, and its command
line plans the big presets in seconds with the trainer's own errors for bad input."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from xpar.bench.a2a_estimate import traffic
from xpar.model import get_preset
from xpar.moe import MoEConfig
from xpar.plan.__main__ import main
from xpar.plan.traffic import rows_per_token

from distributed import REPO, assert_all_ok, run_ranks

CHECK = [str(REPO / "tests" / "plan_check.py")]
ODD = "model.d_model=40 moe.num_experts=6"  # group sizes that DeepSpeed must pad


def held_vs_planned(lines: str) -> list[dict]:
    rows = [json.loads(x) for x in lines.splitlines() if x.startswith("{")]
    assert rows
    return rows


def assert_exact(rows: list[dict]) -> None:
    for r in rows:
        assert r["held"] == r["planned"], (r["rank"], r["job"])
        assert r["held"]["weights"]["dense"] > 0


def test_state_bytes_equal_a_single_process_run(capsys, monkeypatch):
    jobs = ["deepspeed=none", "deepspeed=zero1", f"deepspeed=zero2 {ODD}", "moe=dense",
            "deepspeed=zero2 finetune.train=experts", f"parallel.shard=fsdp {ODD}",
            "parallel.shard=fsdp finetune.train=experts"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["plan_check", *jobs])
    sys.path.insert(0, str(REPO / "tests"))
    import plan_check

    plan_check.main()
    rows = held_vs_planned(capsys.readouterr().out)
    assert len(rows) == len(jobs)
    assert_exact(rows)
    zero2 = rows[2]["held"]
    assert zero2["masters"]["expert"] > 0 and rows[0]["held"]["masters"]["dense"] == 0


# FSDP at EP=2 with 3 experts a rank: over 2 EDP ranks (4 processes) the second holds one of a
# chunk of two, so the ranks' bytes differ.
UNEVEN_FSDP = f"parallel.ep_size=2 parallel.shard=fsdp parallel.shard_size=2 {ODD}"


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("world", "jobs"),
    [
        (2, ["parallel.ep_size=2", "parallel.ep_size=2 deepspeed=zero1",
             f"parallel.ep_size=2 deepspeed=zero2 {ODD}", "moe=dense deepspeed=zero2",
             f"parallel.ep_size=2 parallel.shard=fsdp {ODD}"]),
        (4, ["parallel.ep_size=2", f"parallel.ep_size=2 deepspeed=zero1 {ODD}",
             "parallel.ep_size=2 deepspeed=zero2", UNEVEN_FSDP]),
    ],
    ids=["EP2", "EP2xDP2"],
)  # fmt: skip
def test_state_bytes_equal_every_rank_of_a_parallel_run(world, jobs):
    results = run_ranks([*CHECK, *jobs], world, timeout=600)
    assert_all_ok(results)
    rows = [row for r in results for row in held_vs_planned(r.stdout)]
    assert len(rows) == world * len(jobs)
    assert_exact(rows)
    if UNEVEN_FSDP in jobs:  # HSDP, with shorter chunks on some ranks: planned per rank
        held = [r["held"] for r in rows if r["job"] == UNEVEN_FSDP]
        assert len({json.dumps(h, sort_keys=True) for h in held}) > 1


def uniform_routing(moe: MoEConfig, tokens: int, gen: torch.Generator) -> torch.Tensor:
    """[T, K] expert ids: a uniformly random K-subset of the experts (of `top_groups` random
    groups for two-level routing)."""
    E, K = moe.num_experts, moe.top_k
    if moe.router != "two_level":
        return torch.rand(tokens, E, generator=gen).argsort(-1)[:, :K]
    G, J, X = moe.num_groups, moe.top_groups, moe.experts_per_group
    groups_TJ = torch.rand(tokens, G, generator=gen).argsort(-1)[:, :J]
    experts_TJX = groups_TJ[:, :, None] * X + torch.arange(X)
    pick_TK = torch.rand(tokens, J * X, generator=gen).argsort(-1)[:, :K]
    return experts_TJX.flatten(1).gather(1, pick_TK)


FLAT = MoEConfig(d_model=8, d_ff=8, num_experts=64, top_k=8)
TWO_LEVEL = MoEConfig(
    d_model=8, d_ff=8, num_experts=64, top_k=8, router="two_level", num_groups=8, top_groups=4
)


@pytest.mark.parametrize(
    ("moe", "ep", "dedup"),
    [(FLAT, 8, False), (FLAT, 8, True), (FLAT, 64, True), (TWO_LEVEL, 4, True),
     (TWO_LEVEL, 8, True), (TWO_LEVEL, 16, True), (TWO_LEVEL, 64, True)],
    ids=["flat-ep8", "dedup-ep8", "dedup-ep64", "two-level-ep4", "two-level-ep8",
         "two-level-ep16", "two-level-ep64"],
)  # fmt: skip
def test_all_to_all_rows_are_the_uniform_routing_expectation(moe, ep, dedup):
    idx_TK = uniform_routing(moe, 40_000, torch.Generator().manual_seed(0))
    assert (idx_TK.sort(-1).values.diff(dim=-1) > 0).all()  # K distinct experts a token
    measured = traffic(idx_TK, moe.num_experts, ep, dedup)
    planned = rows_per_token(moe, ep, dedup)
    assert planned.rows == pytest.approx(measured.rows_per_token, rel=0.01)
    assert planned.off_rank == pytest.approx(measured.off_rank_rows_per_token, rel=0.01)


def run_plan(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_mixtral_on_8_h200_is_planned_with_every_figure(capsys):
    code, out, err = run_plan(capsys, "model=mixtral_8x7b", "--gpus", "8", "--gpu", "h200")
    assert code == 0, err
    lines = ("weights", "gradients", "optimizer state", "fp32 masters", "activations",
             "all-to-all buffers", "gradient buffers", "peak allocated", "expert GEMMs",
             "dense GEMMs", "attention", "all-to-all", "gradient reduction", "MFU")  # fmt: skip
    for line in lines:
        assert line in out, line
    assert "to fit on 8 GPUs: parallel.ep_size=" in out  # EP=1 replicates 45B of experts


def test_deepseek_v3_search_on_1024_h200_lists_fitting_layouts(capsys):
    code, out, err = run_plan(
        capsys, "model=deepseek_v3", "--gpus", "1024", "--gpu", "h200", "--search", "--json"
    )
    assert code == 0, err
    found = json.loads(out)
    plans = found["search"]
    assert plans and all(p["fits"] for p in plans)
    times = [p["time_s"]["total"] for p in plans]
    assert times == sorted(times)
    for p in plans:
        mem = p["memory_bytes"]
        assert mem["peak"] + mem["reserve"] <= mem["gpu"]
        assert 0 < p["mfu"] < 1


def test_fsdp_plans_print_their_gathers_and_offload_moves_the_state_to_the_host(capsys):
    job = ["model=mixtral_8x7b", "parallel.ep_size=8", "parallel.shard=fsdp", "--gpus", "16"]
    code, out, err = run_plan(capsys, *job, "parallel.shard_size=8")
    assert code == 0, err
    for line in ("backend fsdp:8", "weights (fp32 shards)", "gathered units (fsdp)",
                 "parameter all-gather", "parallel.shard=fsdp parallel.shard_size=8"):  # fmt: skip
        assert line in out, line
    figures = {}
    for offload in ("false", "true"):
        code, out, err = run_plan(capsys, *job, f"parallel.offload={offload}", "--json")
        assert code == 0, err
        figures[offload] = json.loads(out)["plan"]
    on_gpu, on_host = figures["false"], figures["true"]
    state = sum(sum(on_gpu["memory_bytes"][k].values()) for k in
                ("weights", "grads", "optimizer", "masters"))  # fmt: skip
    assert on_host["memory_bytes"]["host"] == state and on_gpu["memory_bytes"]["host"] == 0
    assert on_host["memory_bytes"]["peak"] == on_gpu["memory_bytes"]["peak"] - state
    assert on_host["time_s"]["host_copy"] > 0 == on_gpu["time_s"]["host_copy"]
    assert on_host["time_s"]["optimizer"] > on_gpu["time_s"]["optimizer"]


def test_fsdp_reducing_every_micro_step_keeps_no_whole_gradients():
    """Under accumulation (4 micro-steps), parallel.reduce_micro_steps drops exactly the whole
    fp32 gradients of this rank's parameters from the peak and reduces 4 times a step."""
    from xpar.plan.__main__ import planned_job
    from xpar.plan.gpus import get_gpu
    from xpar.plan.planner import Cluster, plan_job
    from xpar.plan.state import inventory

    plans = {}
    for each in ("false", "true"):
        job = ["model=mixtral_8x7b", "parallel.ep_size=8", "parallel.shard=fsdp"]
        cfg, _ = planned_job([*job, f"parallel.reduce_micro_steps={each}"], 16)
        plans[each] = plan_job(cfg, Cluster(16, 8, get_gpu("h200")))
    whole, reduced = plans["false"], plans["true"]
    assert whole.accumulation == reduced.accumulation == 4
    inv = inventory(cfg)
    local = sum(inv.dense_groups) + inv.expert_trained // 8
    assert whole.buffers["gradients"] - reduced.buffers["gradients"] == 4 * local
    assert reduced.time.grad_reduce == pytest.approx(4 * whole.time.grad_reduce)
    assert reduced.backend.overrides.endswith("parallel.reduce_micro_steps=true")


@pytest.mark.parametrize("gpus", [128, 64])
def test_fsdp_is_what_fits_deepseek_v3_where_replicated_dense_weights_do_not(gpus):
    """DeepSeek-V3 on 128 or 64 H200s: no layout holding the dense weights whole fits, sharded
    ones do (on 64 only with the state offloaded, which the search tries only then)."""
    from xpar.plan.__main__ import planned_job
    from xpar.plan.gpus import get_gpu
    from xpar.plan.planner import Backend, Cluster, plan_job, search, with_layout

    cfg, _ = planned_job(["model=deepseek_v3"], gpus)
    cluster = Cluster(gpus, 8, get_gpu("h200"))
    plans = search(cfg, cluster)
    fitting = [p for p in plans if p.fits]
    assert fitting and all(p.backend.shard == "fsdp" for p in fitting)
    assert {"plain", "zero1", "zero2", "fsdp", "fsdp:8"} <= {p.backend.name for p in plans}
    on_gpu = [p for p in plans if not p.backend.offload]
    assert any(p.backend.offload for p in plans) == (not any(p.fits for p in on_gpu))
    best = fitting[0]
    assert best.time.param_gather > 0 and best.stage == 0
    zero2 = with_layout(cfg, best.ep_size, best.recompute, Backend(2), best.micro_batch)
    assert not plan_job(zero2, cluster).fits


def test_recompute_trades_memory_for_time_in_the_plan(capsys):
    figures = {}
    for mode in ("none", "experts", "full"):
        code, out, err = run_plan(
            capsys, "model=olmoe_1b_7b", f"trainer.recompute={mode}", "parallel.ep_size=8",
            "--gpus", "16", "--json",
        )  # fmt: skip
        assert code == 0, err
        figures[mode] = json.loads(out)["plan"]
    acts = {m: f["memory_bytes"]["activations"] for m, f in figures.items()}
    steps = {m: f["time_s"] for m, f in figures.items()}
    assert acts["full"] < acts["experts"] < acts["none"]
    assert steps["none"]["total"] < steps["experts"]["total"] < steps["full"]["total"]
    # The full recompute sends its rows again: 6 crossings of the all-to-all instead of 4.
    assert steps["full"]["all_to_all"] == pytest.approx(1.5 * steps["none"]["all_to_all"])
    assert steps["experts"]["all_to_all"] == pytest.approx(steps["none"]["all_to_all"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--gpus", "8", "--gpu", "h300"], "--gpu=h300 is not a GPU the planner knows"),
        (["parallel.ep_size=3", "--gpus", "8"], "parallel.ep_size=3 does not divide the world"),
        (["moe.topk=2"], "unknown key moe.topk (did you mean moe.top_k?)"),
        (["--gpus", "0"], "--gpus=0 must be >= 1"),
        (["--bogus"], "--bogus: not a planner option"),
        (["data.batch_size=6", "--gpus", "4"], "data.batch_size=6 is not divisible"),
    ],
    ids=["gpu_name", "layout", "key", "gpu_count", "flag", "batch"],
)
def test_bad_input_is_one_line_from_the_trainers_checks(capsys, argv, message):
    code, out, err = run_plan(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("xpar: error: ") and err.count("\n") == 1 and message in err, err


def test_the_presets_are_planned_without_building_them():
    # The meta-device inventory: DeepSeek-V3's 671B parameters, counted, not allocated.
    from xpar.model import count_params
    from xpar.plan.state import inventory

    sys.path.insert(0, str(REPO / "tests"))
    from jobs import build

    cfg = build(["model=deepseek_v3", "run_name=x"])
    inv = inventory(cfg)
    assert inv.total == count_params(get_preset("deepseek_v3")).total


README_PRESETS = [("mixtral_8x7b", 8), ("mixtral_8x7b", 16), ("mixtral_8x7b", 64),
                  ("deepseek_v3", 64), ("deepseek_v3", 128), ("deepseek_v3", 256),
                  ("deepseek_v3", 1024), ("olmoe_1b_7b", 8),
                  ("deepseek_v2_lite", 8), ("moe_300m", 1)]  # fmt: skip


def preset_row(capsys, preset: str, gpus: int) -> str:
    code, out, err = run_plan(capsys, f"model={preset}", "--gpus", str(gpus), "--search",
                              "--top", "1", "--json")  # fmt: skip
    assert code == 0, err
    best = json.loads(out)["search"][0]
    if not best["fits"]:
        return f"| `{preset}` | {gpus} | nothing fits | | | |"
    lay = best["layout"]
    if lay["shard"] == "fsdp":
        backend = "shard=fsdp" + (f", shard_size={lay['shard_size']}" if lay["shard_size"] else "")
        backend += ", offload=true" if lay["offload"] else ""
        backend += ", reduce_micro_steps=true" if lay["reduce_micro_steps"] else ""
    else:
        backend = "deepspeed=" + ("none" if lay["zero_stage"] == 0 else f"zero{lay['zero_stage']}")
    return (
        f"| `{preset}` | {gpus} | ep_size={lay['ep_size']}, recompute={lay['recompute']}, "
        f"{backend}, micro-batch {lay['micro_batch']} | "
        f"{best['memory_bytes']['peak'] / 2**30:.0f} | {best['time_s']['total']:.2f} | "
        f"{best['mfu']:.0%} |"
    )


def test_the_readme_table_of_presets_is_the_planners(capsys):
    head = [
        "| preset | H200s | fastest layout that fits | peak GiB | step s | MFU |",
        "|---|---|---|---|---|---|",
    ]
    want = "\n".join(head + [preset_row(capsys, p, n) for p, n in README_PRESETS])
    assert want in (REPO / "README.md").read_text(), f"the README's table should be:\n{want}"
