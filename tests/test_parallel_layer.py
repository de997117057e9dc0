"""The expert-parallel MoE layer against the single-process layer, in 2 and 4 CPU processes."""

import pytest

from xpar.checks import UserError
from xpar.config import ParallelConfig
from xpar.moe import MoEConfig
from xpar.parallel.mesh import check_layout

from distributed import REPO, assert_all_ok, run_ranks

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("world,ep", [(2, 2), (4, 4), (4, 2)], ids=["EP2", "EP4", "EP2xDP2"])
def test_ep_layer_matches_single_process(world, ep):
    results = run_ranks([str(REPO / "tests/ep_layer_check.py"), str(ep)], world, timeout=600)
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
