"""The expert-parallel MoE layer against the single-process layer, in 2 and 4 CPU processes."""

import pytest
from distributed import REPO, assert_all_ok, run_ranks

from xpar.checks import UserError
from xpar.config import ParallelConfig
from xpar.moe import MoEConfig
from xpar.parallel.mesh import check_layout

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("world,ep", [(2, 2), (4, 4), (4, 2)], ids=["EP2", "EP4", "EP2xDP2"])
def test_ep_layer_matches_single_process(world, ep):
    results = run_ranks([str(REPO / "tests/ep_layer_check.py"), str(ep)], world, timeout=600)
    assert_all_ok(results)
    assert all("all cases match" in r.stdout for r in results)
