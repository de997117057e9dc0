"""Every invalid MoEConfig raises ValueError naming the field."""

import pytest

from xpar.moe import MoEConfig

BASE = dict(d_model=8, d_ff=8, num_experts=8, top_k=2)
TWO = dict(BASE, router="two_level", num_groups=4, top_groups=2)

BAD = [
    (dict(BASE, top_k=0), r"moe\.top_k=0 must be in \[1, num_experts=8\]"),
    (dict(BASE, top_k=9), r"moe\.top_k=9 must be in \[1, num_experts=8\]"),
    (dict(TWO, num_groups=3), r"moe\.num_experts=8 is not divisible by moe\.num_groups=3"),
    (dict(TWO, top_groups=5), r"moe\.top_groups=5 must be in \[1, num_groups=4\]"),
    (dict(TWO, top_groups=1, top_k=3), r"moe\.top_k=3 must be <= top_groups \* experts"),
    (dict(BASE, capacity_factor=0.0), r"moe\.capacity_factor=0\.0 must be > 0"),
    (dict(BASE, capacity_factor=-1.0), r"moe\.capacity_factor=-1\.0 must be > 0"),
    (dict(BASE, router="expert_choice"), r"moe\.router='expert_choice' is not one of"),
    (dict(BASE, score_func="relu"), r"moe\.score_func='relu' is not one of"),
    (dict(BASE, drop_policy="random"), r"moe\.drop_policy='random' is not one of"),
    (dict(TWO, group_score="max"), r"moe\.group_score='max' is not one of"),
    (dict(TWO, group_topk_experts=3), r"moe\.group_topk_experts=3 must be in \[1,"),
    (dict(TWO, group_capacity_factor=0.0), r"moe\.group_capacity_factor=0\.0 must be > 0"),
    (dict(BASE, num_experts=0, top_k=1), r"moe\.num_experts=0 must be >= 1"),
    (dict(BASE, aux_loss_coef=-0.1), r"moe\.aux_loss_coef=-0\.1 must be >= 0"),
    (dict(BASE, experts_impl="triton"), r"moe\.experts_impl='triton' is not one of"),
    (dict(BASE, pad_to_capacity=True), r"moe\.pad_to_capacity=True needs a moe\.capacity_factor"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m.split("=")[0][5:] for _, m in BAD])
def test_invalid_config_names_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**kwargs)


def test_valid_configs():
    assert MoEConfig(**TWO).experts_per_group == 2
    assert MoEConfig(**BASE, num_shared_experts=2).shared_hidden == 16
    assert MoEConfig(**BASE).shared_hidden == 0
