"""The planner (`python -m xpar.plan`): its model-state bytes equal what a real run's tensors
hold, its all-to-all rows equal xpar's own estimate on uniformly random routing (and, flat or
hierarchical, every route counted by hand on small layers), and its command line plans the big
presets in seconds with the trainer's own errors for bad input."""

from __future__ import annotations

import json
import sys
from itertools import combinations

import pytest
import torch

from xpar.bench.a2a_estimate import traffic
from xpar.model import get_preset
from xpar.moe import MoEConfig
from xpar.plan.__main__ import main
from xpar.plan.traffic import nodes_touched, rows_per_token

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


def every_route(moe: MoEConfig) -> list[tuple[int, ...]]:
    """Every K-subset of experts uniform routing may pick, each once: all equally likely (for
    two-level, every choice of groups pools as many subsets)."""
    E, K = moe.num_experts, moe.top_k
    if moe.router != "two_level":
        return list(combinations(range(E), K))
    G, J, X = moe.num_groups, moe.top_groups, moe.experts_per_group
    pools = ([g * X + x for g in groups for x in range(X)] for groups in combinations(range(G), J))
    return [route for pool in pools for route in combinations(pool, K)]


def counted(
    routes: list[tuple[tuple[int, ...], int]], X: int, L: int, dedup: bool, hierarchical: bool
) -> tuple[float, float]:
    """Mean rows a token sends over the network and over NVLink, the dispatcher's way, over
    (experts, source rank) pairs (X experts a rank, L ranks a node): flat, each row straight to
    its rank; hierarchical, once to each other node, to the rank of the source's local index,
    which forwards to the ranks of its node and keeps its own."""
    inter = intra = 0
    for experts, src in routes:
        ranks = [e // X for e in experts]
        node, local = divmod(src, L)
        rows = set(ranks) if dedup else ranks  # one row per rank, or per slot
        if hierarchical:
            inter += len({r // L for r in ranks} - {node})
            intra += sum(r % L != local for r in rows)
        else:
            inter += sum(r // L != node for r in rows)
            intra += sum(r // L == node and r != src for r in rows)
    return inter / len(routes), intra / len(routes)


SMALL = MoEConfig(d_model=8, d_ff=8, num_experts=8, top_k=2)


def small_groups(num_experts: int, num_groups: int, top_groups: int) -> MoEConfig:
    return MoEConfig(d_model=8, d_ff=8, num_experts=num_experts, top_k=2, router="two_level",
                     num_groups=num_groups, top_groups=top_groups)  # fmt: skip


def test_nodes_touched_is_the_mean_over_every_pair_of_experts():
    """E=8, k=2, EP=4 on 2 nodes of 2 ranks (4 experts a node): of the C(8, 2) = 28 pairs, the
    C(4, 2) = 6 inside each node touch one node, the other 16 both: 2 - 12 / 28 = 11 / 7."""
    pairs = every_route(SMALL)
    assert len(pairs) == 28
    mean = sum(len({e // 4 for e in pair}) for pair in pairs) / len(pairs)
    assert mean == pytest.approx(11 / 7) and nodes_touched(SMALL, 4, 2) == pytest.approx(mean)


@pytest.mark.parametrize("hierarchical", [False, True], ids=["flat", "hierarchical"])
@pytest.mark.parametrize("dedup", [False, True], ids=["slots", "dedup"])
@pytest.mark.parametrize(
    ("moe", "ep", "per_node"),
    [(SMALL, 4, 2), (small_groups(8, 4, 2), 4, 2), (small_groups(8, 2, 1), 8, 2),
     (small_groups(24, 4, 1), 12, 2)],
    ids=["flat-router", "nodes-hold-groups", "groups-span-nodes", "nodes-straddle-groups"],
)  # fmt: skip
def test_rows_over_each_link_are_every_route_counted(moe, ep, per_node, dedup, hierarchical):
    routes = [(r, src) for r in every_route(moe) for src in range(ep)]
    inter, intra = counted(routes, moe.num_experts // ep, per_node, dedup, hierarchical)
    planned = rows_per_token(moe, ep, dedup, per_node, hierarchical)
    assert planned.off_node == pytest.approx(inter, rel=1e-12)
    assert planned.intra_node == pytest.approx(intra, rel=1e-12)
    if hierarchical:  # the first hop: one row per node touched, its own node's kept
        assert planned.hops[0] == pytest.approx(nodes_touched(moe, ep, per_node))


@pytest.mark.parametrize(
    ("moe", "ep", "per_node"), [(FLAT, 16, 4), (TWO_LEVEL, 16, 4), (TWO_LEVEL, 64, 8)],
    ids=["flat-ep16", "two-level-ep16", "two-level-ep64"],
)  # fmt: skip
def test_hierarchical_rows_are_the_uniform_routing_expectation(moe, ep, per_node):
    idx_TK = uniform_routing(moe, 20_000, torch.Generator().manual_seed(0))
    routes = [(tuple(r), t % ep) for t, r in enumerate(idx_TK.tolist())]
    inter, intra = counted(routes, moe.num_experts // ep, per_node, True, True)
    planned = rows_per_token(moe, ep, True, per_node, hierarchical=True)
    assert planned.off_node == pytest.approx(inter, rel=0.01)
    assert planned.intra_node == pytest.approx(intra, rel=0.01)


def test_two_level_groups_on_nodes_bound_the_nodes_a_token_reaches():
    """DeepSeek-V3's 8 groups, top-4: on 8 or 4 nodes (each holding whole groups) a token
    reaches at most 4 nodes, so at most 4 rows cross the network; on 16 (each group 2 nodes)
    at most 8. Counted by hand: nodes holding 2 of 4 groups, top-2."""
    moe = get_preset("deepseek_v3").moe
    for ep, nodes in ((64, 8), (32, 4), (128, 16)):
        reach = moe.top_groups * max(nodes // moe.num_groups, 1)
        assert nodes_touched(moe, ep, 8) <= reach
        assert rows_per_token(moe, ep, True, 8, hierarchical=True).off_node <= reach
    small = small_groups(8, 4, 2)
    assert max(len({e // 4 for e in r}) for r in every_route(small)) == small.top_groups
    assert rows_per_token(small, 4, True, 2, hierarchical=True).off_node <= small.top_groups


def dsv3_plans(ep: int, gpus: int = 64):
    from xpar.plan.__main__ import planned_job
    from xpar.plan.gpus import get_gpu
    from xpar.plan.planner import Cluster, plan_job

    cluster = Cluster(gpus, 8, get_gpu("h200"))
    plans = {}
    for a2a in ("flat", None):
        given = [f"parallel.a2a={a2a}"] if a2a else []
        cfg, _ = planned_job(["model=deepseek_v3", f"parallel.ep_size={ep}", *given], gpus)
        plans[a2a or "auto"] = plan_job(cfg, cluster)
    return plans, cluster


@pytest.mark.parametrize("ep", [16, 64])
def test_hierarchical_sends_deepseek_v3_fewer_bytes_over_the_network_on_8_nodes(ep):
    plans, cluster = dsv3_plans(ep)
    flat, hier = plans["flat"], plans["auto"]
    assert (flat.a2a, hier.a2a) == ("flat", "hierarchical")
    assert "parallel.a2a=flat" in flat.overrides and "parallel.a2a" not in hier.overrides
    gb = {p.a2a: p.time.a2a_gb for p in (flat, hier)}
    assert gb["hierarchical"]["inter_node"] < gb["flat"]["inter_node"]
    assert gb["hierarchical"]["intra_node"] > gb["flat"]["intra_node"]
    # The flat all-to-all drives both links at once; the hierarchical one's hops run in turn.
    gbps = {"intra_node": cluster.gpu.nvlink_gbps, "inter_node": cluster.gpu.network_gbps}
    link = {k: v * 1e9 * cluster.efficiency.network for k, v in gbps.items()}
    alone = {p.a2a: {k: p.time.a2a_gb[k] * 1e9 / link[k] for k in link} for p in (flat, hier)}
    assert flat.time.all_to_all == pytest.approx(max(alone["flat"].values()))
    assert hier.time.all_to_all == pytest.approx(sum(alone["hierarchical"].values()))


@pytest.mark.parametrize(
    ("gpus", "per_node", "ep"),
    [(16, 8, 8), (16, 8, 16), (16, 4, 8), (8, 8, 8), (32, 8, 4), (16, 8, 1), (32, 8, 32)],
)
def test_the_all_to_all_is_hierarchical_exactly_where_ep_spans_nodes(capsys, gpus, per_node, ep):
    argv = ["model=olmoe_1b_7b", f"parallel.ep_size={ep}", "--gpus", str(gpus),
            "--gpus-per-node", str(per_node)]  # fmt: skip
    spans = ep > per_node and ep % per_node == 0
    code, out, err = run_plan(capsys, *argv, "--json")
    assert code == 0, err
    assert json.loads(out)["plan"]["layout"]["a2a"] == ("hierarchical" if spans else "flat")
    code, out, err = run_plan(capsys, *argv)
    assert code == 0, err
    assert f"a2a {'hierarchical' if spans else 'flat'})" in out


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
        (
            ["parallel.ep_size=8", "parallel.a2a=hierarchical", "--gpus", "16"],
            "parallel.a2a=hierarchical needs each EP group to span whole nodes",
        ),
        (
            ["parallel.ranks_per_node=4", "--gpus", "16"],
            "parallel.ranks_per_node=4 is not the planner's 8 GPUs a node",
        ),
        (["--gpus", "12"], "--gpus=12 is not a whole number of nodes of --gpus-per-node=8"),
    ],
    ids=["gpu_name", "layout", "key", "gpu_count", "flag", "batch", "a2a", "node_size", "nodes"],
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
