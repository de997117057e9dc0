"""Capacity: bounds, both drop policies on a hand-built case, padding, dropped fraction."""

import math

import pytest
import torch

from xpar.moe import MoEConfig, MoELayer, expert_capacity, route_slots


def _random_routing(T, E, K, seed):
    g = torch.Generator().manual_seed(seed)
    # Skewed preferences so that some experts overflow.
    logits = torch.randn(T, E, generator=g) + torch.linspace(2, 0, E)
    w, idx = logits.softmax(-1).topk(K, dim=-1)
    return idx, w


@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_kept_within_capacity_and_conserved(policy, pad, seed):
    T, E, K, cap = 40, 6, 2, 9
    idx, w = _random_routing(T, E, K, seed)
    route = route_slots(idx, w, None, E, cap, policy, pad)
    kept_slots = route.row_of_slot_N < route.num_rows - 1
    assert torch.all(route.row_of_slot_N[~kept_slots] == route.num_rows - 1)
    kept_per_expert = torch.bincount(idx.flatten()[kept_slots], minlength=E)
    assert torch.all(kept_per_expert <= cap)
    assert torch.equal(kept_per_expert, route.kept_per_expert_E)
    dropped = int((~kept_slots).sum())
    assert int(kept_slots.sum()) + dropped == T * K
    # Capacity drops only what overflows: each expert keeps min(load, cap).
    load = torch.bincount(idx.flatten(), minlength=E)
    assert torch.equal(kept_per_expert, load.clamp(max=cap))
    # Kept slots get distinct rows, each inside its expert's block.
    rows = route.row_of_slot_N[kept_slots]
    assert rows.unique().numel() == rows.numel()
    starts = route.rows_per_expert_E.cumsum(0) - route.rows_per_expert_E
    e = idx.flatten()[kept_slots]
    assert torch.all(rows >= starts[e]) and torch.all(rows < starts[e] + route.rows_per_expert_E[e])


def _hand_layer(policy, pad=False):
    # 6 tokens, 2 experts, top-1, capacity ceil(2/3 * 6 * 1 / 2) = 2.
    cfg = MoEConfig(
        d_model=2, d_ff=4, num_experts=2, top_k=1, capacity_factor=2 / 3, min_capacity=0,
        drop_policy=policy, pad_to_capacity=pad,
    )  # fmt: skip
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    # Expert 0 wanted by tokens 0-3 with weights rising with x[0]; expert 1 by 4-5.
    x = torch.tensor([[0.5, 0.0], [3.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    return layer, x


@pytest.mark.parametrize("policy,kept", [("position", [0, 1, 4, 5]), ("probs", [1, 3, 4, 5])])
def test_drop_policies_keep_the_right_slots(policy, kept):
    layer, x = _hand_layer(policy)
    assert expert_capacity(6, 2, 1, layer.cfg) == 2
    out, aux = layer(x)
    nonzero = [t for t in range(6) if out[t].abs().sum() > 0]
    assert nonzero == kept
    assert aux.dropped_fraction == pytest.approx(2 / 6)


@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("router", ["topk", "two_level"])
def test_padded_and_unpadded_outputs_identical(policy, router):
    kw = dict(d_model=8, d_ff=16, num_experts=8, top_k=2, capacity_factor=0.75, router=router,
              num_groups=4, top_groups=2, drop_policy=policy)  # fmt: skip
    torch.manual_seed(1)
    unpadded = MoELayer(MoEConfig(**kw))
    padded = MoELayer(MoEConfig(**kw, pad_to_capacity=True))
    padded.load_state_dict(unpadded.state_dict())
    x = torch.randn(30, 8) + 0.5
    outs, grads = [], []
    for layer in (unpadded, padded):
        xi = x.clone().requires_grad_()
        out, aux = layer(xi)
        out.square().sum().backward()
        outs.append(out)
        grads.append([xi.grad] + [p.grad for p in layer.parameters()])
    assert aux.dropped_fraction > 0  # the case really drops something
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cf", [0.5, 1.0, 1.25])
def test_reported_dropped_fraction_matches_recount(cf):
    cfg = MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2, capacity_factor=cf)
    layer = MoELayer(cfg)
    x = torch.randn(50, 8) + 1.0
    _, aux = layer(x)
    idx = layer.router(x).topk_idx_TK
    cap = max(math.ceil(cf * 50 * 2 / 4), cfg.min_capacity)
    load = torch.bincount(idx.flatten(), minlength=4)
    recount = (load - load.clamp(max=cap)).sum().item() / (50 * 2)
    assert aux.dropped_fraction == pytest.approx(recount, abs=1e-7)
    assert torch.equal(aux.tokens_per_expert, load)


def test_capacity_formula_and_min_capacity():
    cfg = MoEConfig(d_model=4, d_ff=4, num_experts=8, top_k=2, capacity_factor=1.25, min_capacity=4)
    assert expert_capacity(100, 8, 2, cfg) == math.ceil(1.25 * 100 * 2 / 8)
    assert expert_capacity(8, 8, 2, cfg) == 4  # min_capacity wins
    assert expert_capacity(3, 8, 2, cfg) == 3  # never more than T
    assert expert_capacity(100, 8, 2, MoEConfig(d_model=4, d_ff=4, num_experts=8)) is None


def test_group_capacity_drops_late_tokens_of_a_full_group():
    cfg = MoEConfig(d_model=4, d_ff=4, num_experts=4, top_k=1, router="two_level", num_groups=2,
                    top_groups=1, group_score="topk_sum", group_capacity_factor=0.5,
                    min_capacity=0)  # fmt: skip
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.eye(4))
    x = torch.eye(4)[[0, 0, 0, 2]] * 5  # three tokens want group 0, one wants group 1
    r = layer.router(x)
    # group capacity = ceil(0.5 * 4 * 1 / 2) = 1: only the first group-0 token fits.
    assert r.keep_TK.flatten().tolist() == [True, False, False, True]
    out, aux = layer(x)
    assert aux.dropped_fraction == pytest.approx(0.5)
    assert out[1].abs().sum() == 0 and out[2].abs().sum() == 0 and out[0].abs().sum() > 0
