"""Router losses by hand, deterministic ties, aux-loss-free bias, jitter, two-level property."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from xpar.moe import MoEConfig, MoELayer, TopKRouter, TwoLevelRouter
from xpar.moe.router import load_balance_loss

LOGITS = [[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 0.5, 0.5], [1.0, 1.5, 2.0, -2.0]]


def _identity_router(**kw):
    cfg = MoEConfig(d_model=4, d_ff=4, num_experts=4, **kw)
    router = TopKRouter(cfg)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4))
    return router


def _softmax(row):
    z = sum(math.exp(v) for v in row)
    return [math.exp(v) / z for v in row]


def test_aux_and_z_loss_match_hand_computation():
    router = _identity_router(top_k=2, aux_loss_coef=0.1, z_loss_coef=0.01)
    out = router(torch.tensor(LOGITS))
    probs = [_softmax(r) for r in LOGITS]
    chosen = [sorted(range(4), key=lambda e: -p[e])[:2] for p in probs]
    f = [sum(e in c for c in chosen) / (3 * 2) for e in range(4)]
    P = [sum(p[e] for p in probs) / 3 for e in range(4)]
    aux = 4 * sum(fe * pe for fe, pe in zip(f, P, strict=True))
    z = sum(math.log(sum(math.exp(v) for v in r)) ** 2 for r in LOGITS) / 3
    aux_loss = load_balance_loss(out.probs_mean_E, out.tokens_per_expert_E)
    assert aux_loss.item() == pytest.approx(aux, rel=1e-6)
    assert out.z_loss.item() == pytest.approx(z, rel=1e-6)
    assert [sorted(c) for c in out.topk_idx_TK.tolist()] == [sorted(c) for c in chosen]
    ent = -sum(sum(pi * math.log(pi) for pi in p) for p in probs) / 3
    assert out.entropy.item() == pytest.approx(ent, rel=1e-6)


def test_aux_loss_is_one_at_perfect_balance():
    router = _identity_router(top_k=1)
    out = router(torch.eye(4) * 3)  # token t prefers expert t; P is uniform by symmetry
    aux_loss = load_balance_loss(out.probs_mean_E, out.tokens_per_expert_E)
    assert aux_loss.item() == pytest.approx(1.0, rel=1e-6)


def test_layer_loss_weighs_aux_and_z_losses():
    layer = MoELayer(
        MoEConfig(d_model=4, d_ff=4, num_experts=4, aux_loss_coef=0.1, z_loss_coef=0.01)
    )
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.eye(4))
    _, aux = layer(torch.tensor(LOGITS))
    expected = load_balance_loss(
        layer.router(torch.tensor(LOGITS)).probs_mean_E, aux.tokens_per_expert
    )
    assert aux.aux_loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert aux.loss.item() == pytest.approx(0.1 * aux.aux_loss.item() + 0.01 * aux.z_loss.item())
    assert aux.loss.requires_grad


def test_sigmoid_weights_renormalised_and_scaled():
    router = _identity_router(top_k=2, score_func="sigmoid", norm_topk_prob=True, route_scale=2.5)
    out = router(torch.tensor(LOGITS))
    for row, idx, w in zip(LOGITS, out.topk_idx_TK.tolist(), out.topk_w_TK.tolist(), strict=True):
        s = [1 / (1 + math.exp(-row[e])) for e in idx]
        assert w == pytest.approx([2.5 * v / sum(s) for v in s], rel=1e-6)


def test_ties_resolve_to_lowest_index_every_run():
    router = _identity_router(top_k=2)
    x = torch.zeros(5, 4)  # every score equal
    x[3] = torch.tensor([0.0, 1.0, 1.0, 1.0])  # three-way tie among 1..3
    for _ in range(3):
        idx = router(x).topk_idx_TK.tolist()
        assert idx == [[0, 1]] * 3 + [[1, 2]] + [[0, 1]]


def test_two_level_ties_resolve_deterministically():
    cfg = MoEConfig(d_model=8, d_ff=4, num_experts=8, top_k=2, router="two_level",
                    num_groups=4, top_groups=2, group_score="topk_sum")  # fmt: skip
    router = TwoLevelRouter(cfg)
    with torch.no_grad():
        router.gate.weight.zero_()
    idx = router(torch.randn(4, 8)).topk_idx_TK
    assert idx.tolist() == [[0, 1]] * 4  # groups 0 and 1 win the tie, then experts 0 and 1


def test_bias_moves_skewed_load_toward_uniform_and_is_saved():
    cfg = MoEConfig(d_model=8, d_ff=8, num_experts=8, top_k=2, bias_update_rate=0.005)
    router = TopKRouter(cfg).train()
    u = torch.ones(8) / 8**0.5
    with torch.no_grad():  # experts 0 and 1 favoured by most tokens
        router.gate.weight.normal_(std=0.5)
        router.gate.weight[0] += 2 * u
        router.gate.weight[1] += u

    def batch():
        return torch.randn(512, 8) + u

    def imbalance():  # max/mean load over fresh batches; about 1.2 by chance alone
        loads = [torch.bincount(router(batch()).topk_idx_TK.flatten(), minlength=8).float()
                 for _ in range(10)]  # fmt: skip
        router.pending_load.zero_()
        return sum((ld.max() / ld.mean()).item() for ld in loads) / len(loads)

    with torch.no_grad():
        before = imbalance()
        for _ in range(300):
            router(batch())
            router.update_bias()
        after = imbalance()
    assert before > 2.0
    assert after < 1.4
    # The bias shifts selection only: the chosen experts' weights are their raw scores.
    x = batch()
    out = router(x)
    probs = router.gate(x).softmax(-1)
    torch.testing.assert_close(out.topk_w_TK, probs.gather(1, out.topk_idx_TK))
    assert router.expert_bias[0] < 0 < router.expert_bias[2:].min()
    assert "expert_bias" in router.state_dict()
    assert "pending_load" not in router.state_dict()


def test_bias_update_takes_external_global_load():
    router = TopKRouter(MoEConfig(d_model=4, d_ff=4, num_experts=4, bias_update_rate=0.1))
    router.update_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))


def test_jitter_only_in_training():
    router = _identity_router(top_k=1, jitter_eps=0.5)
    x = torch.randn(64, 4)
    router.eval()
    torch.testing.assert_close(router(x).topk_w_TK, router(x).topk_w_TK, rtol=0, atol=0)
    router.train()
    a, b = router(x).topk_w_TK, router(x).topk_w_TK
    assert not torch.equal(a, b)


@settings(max_examples=60, deadline=None)
@given(
    groups=st.integers(1, 6),
    per_group=st.integers(1, 5),
    data=st.data(),
    group_score=st.sampled_from(["learned", "topk_sum"]),
    score_func=st.sampled_from(["softmax", "sigmoid"]),
    seed=st.integers(0, 2**16),
)
def test_two_level_experts_lie_in_at_most_top_groups(
    groups, per_group, data, group_score, score_func, seed
):
    top_groups = data.draw(st.integers(1, groups))
    top_k = data.draw(st.integers(1, top_groups * per_group))
    m = data.draw(st.integers(1, per_group))
    cfg = MoEConfig(
        d_model=6,
        d_ff=4,
        num_experts=groups * per_group,
        top_k=top_k,
        router="two_level",
        num_groups=groups,
        top_groups=top_groups,
        group_score=group_score,
        score_func=score_func,
        group_topk_experts=m,
    )
    torch.manual_seed(seed)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.expert_bias.normal_(std=0.1)
    idx = layer.router(torch.randn(17, 6) * 3).topk_idx_TK
    for row in idx.tolist():
        assert len(set(row)) == top_k
        assert len({e // per_group for e in row}) <= top_groups
