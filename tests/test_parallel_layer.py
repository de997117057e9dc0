"""The expert-parallel MoE layer against the single-process layer, in 2 and 4 CPU processes."""

import pytest

from xpar.checks import UserError
from xpar.config import ParallelConfig
from xpar.moe import MoEConfig
from xpar.parallel.mesh import check_layout, hierarchical_a2a

from distributed import REPO, assert_all_ok, run_ranks

pytestmark = pytest.mark.distributed


LAYOUTS = {  # world, ep_size, ranks a node for the hierarchical dispatcher (and flat's stats)
    "EP2": (2, 2, []),
    "EP4 as 2 nodes x 2": (4, 4, [2]),
    "EP2xDP2 as 4 nodes x 1": (4, 2, [1]),
    "EP8 as 2 nodes x 4 and 4 x 2": (8, 8, [4, 2]),
}


@pytest.mark.parametrize("world,ep,per_node", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_ep_layer_matches_single_process(world, ep, per_node):
    args = [str(REPO / "tests/ep_layer_check.py"), str(ep), *map(str, per_node)]
    results = run_ranks(args, world, timeout=900)
    assert_all_ok(results)
    assert all("all cases match" in r.stdout for r in results)


MOE = dict(d_model=8, d_ff=8, num_experts=8, top_k=2)
LAYOUT_ERRORS = [
    (4, 3, MOE, r"parallel\.ep_size=3 does not divide the world size 4"),
    (1, 2, MOE, r"ep_size=2 does not divide the world size 1 \(launch with torchrun"),
    (2, 2, dict(MOE, num_experts=6, top_k=2), None),  # 6 / 2 fits
    (4, 4, dict(MOE, num_experts=6), r"moe\.num_experts=6 is not divisible by parallel\.ep_size=4"),
    (2, 2, None, r"needs MoE layers"),
    (
        2,
        2,
        dict(MOE, num_experts=12, router="two_level", num_groups=3, top_groups=1),
        r"moe\.num_groups=3 does not map onto parallel\.ep_size=2 ranks",
    ),
    (8, 8, dict(MOE, router="two_level", num_groups=2, top_groups=1), None),  # 4 ranks a group
    (2, 2, dict(MOE, capacity_factor=1.0, pad_to_capacity=True), r"pad_to_capacity=True is"),
]


@pytest.mark.parametrize("world,ep,moe,error", LAYOUT_ERRORS)
def test_layout_checks_need_no_process_group(world, ep, moe, error):
    cfg = None if moe is None else MoEConfig(**moe)
    if error is None:
        check_layout(ParallelConfig(ep_size=ep), cfg, world)
    else:
        with pytest.raises(UserError, match=error):
            check_layout(ParallelConfig(ep_size=ep), cfg, world)


NODE_ERRORS = [
    (8, dict(ep_size=4, ranks_per_node=3), r"parallel\.ranks_per_node=3 does not divide"),
    (8, dict(ep_size=4, ranks_per_node=4, a2a="hierarchical"), r"span whole nodes"),
    (8, dict(ep_size=2, ranks_per_node=4, a2a="hierarchical"), r"ep_size=2 is not a multiple"),
    (12, dict(ep_size=4, ranks_per_node=6, a2a="hierarchical"), r"ranks_per_node=6 above"),
    (8, dict(ep_size=8, ranks_per_node=4, a2a="hierarchical"), None),
]


@pytest.mark.parametrize("world,parallel,error", NODE_ERRORS)
def test_node_layout_checks(world, parallel, error):
    moe = MoEConfig(**MOE)
    if error is None:
        check_layout(ParallelConfig(**parallel), moe, world)
    else:
        with pytest.raises(UserError, match=error):
            check_layout(ParallelConfig(**parallel), moe, world)


def test_a2a_mode_defaults_to_hierarchical_when_an_ep_group_spans_nodes(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's ranks a node
    assert hierarchical_a2a(ParallelConfig(ep_size=8), 16)
    assert not hierarchical_a2a(ParallelConfig(ep_size=4), 16)  # one node per EP group
    assert not hierarchical_a2a(ParallelConfig(ep_size=8, a2a="flat"), 16)
    assert not hierarchical_a2a(ParallelConfig(ep_size=8, ranks_per_node=8), 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # no torchrun: one node
    assert not hierarchical_a2a(ParallelConfig(ep_size=8), 8)
    with pytest.raises(ValueError, match=r"parallel\.a2a='ring' is not one of"):
        ParallelConfig(a2a="ring")
