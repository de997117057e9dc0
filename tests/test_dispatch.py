"""Permute/unpermute index math, with no process group: exact round trips and layouts."""

import pytest
import torch

from xpar.moe import LocalDispatcher, MoEConfig

CASES = {
    "random": lambda T, E, K: torch.stack([torch.randperm(E)[:K] for _ in range(T)]),
    "all_to_one": lambda T, E, K: torch.arange(K).expand(T, K).clone(),
    "some_idle": lambda T, E, K: torch.stack([torch.randperm(E // 2)[:K] * 2 for _ in range(T)]),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("K", [1, 2, 3])
def test_round_trip_is_exact(case, K):
    T, E, D = 13, 8, 5
    idx = CASES[case](T, E, K)
    x = torch.randn(T, D)
    disp = LocalDispatcher(MoEConfig(d_model=D, d_ff=4, num_experts=E, top_k=K))
    x_MD, rows_E, ctx = disp.dispatch(x, idx, torch.rand(T, K))
    # Rows are the tokens, grouped by expert in expert order, token order inside an expert.
    expected = [t for e in range(E) for t in range(T) if e in idx[t].tolist()]
    assert torch.equal(x_MD[:-1], x[expected])
    assert x_MD.shape[0] == T * K + 1  # one trailing padding row
    assert rows_E.tolist() == [int((idx == e).sum()) for e in range(E)]
    # Picking each token's k-th slot with weight 1 returns x bitwise.
    for k in range(K):
        ctx.topk_w_TK = torch.nn.functional.one_hot(torch.full((T,), k), K).float()
        assert torch.equal(disp.combine(x_MD, ctx), x)


@pytest.mark.parametrize("case", CASES)
def test_permute_backward_sums_slot_gradients(case):
    T, E, D, K = 9, 6, 4, 2
    idx = CASES[case](T, E, K)
    x = torch.randn(T, D, requires_grad=True)
    disp = LocalDispatcher(MoEConfig(d_model=D, d_ff=4, num_experts=E, top_k=K))
    x_MD, _, _ = disp.dispatch(x, idx, torch.rand(T, K))
    g = torch.randn_like(x_MD)
    (x_MD * g).sum().backward()
    ref = torch.zeros(T, D)
    order = [t for e in range(E) for t in range(T) if e in idx[t].tolist()]
    for row, t in enumerate(order):
        ref[t] += g[row]
    torch.testing.assert_close(x.grad, ref)


def test_capacity_round_trip_zeroes_only_dropped_slots():
    T, E, D, K = 12, 4, 3, 2
    idx = CASES["all_to_one"](T, E, K)  # experts 0 and 1 get every token
    cfg = MoEConfig(d_model=D, d_ff=4, num_experts=E, top_k=K, capacity_factor=1.0)
    disp = LocalDispatcher(cfg)  # capacity = ceil(12 * 2 / 4) = 6
    x = torch.randn(T, D)
    x_MD, rows_E, ctx = disp.dispatch(x, idx, torch.ones(T, K))
    assert rows_E.tolist() == [6, 6, 0, 0]
    assert x_MD.shape[0] == min(T * K, E * 6) + 1
    assert torch.equal(x_MD[:6], x[:6]) and torch.equal(x_MD[6:12], x[:6])
    # Whatever the padding rows past the 12 kept ones hold, dropped slots weigh nothing.
    y_MD = torch.cat([x_MD[:12], torch.full((x_MD.shape[0] - 12, D), 1e6)])
    out = disp.combine(y_MD, ctx)
    assert torch.equal(out[:6], 2 * x[:6])
    assert torch.count_nonzero(out[6:]) == 0
    assert float(ctx.dropped_fraction) == pytest.approx(0.5)


@pytest.mark.parametrize("pad", [False, True])
def test_combine_backward_matches_autograd_and_skips_padding(pad):
    T, E, D, K = 10, 4, 3, 2
    idx = CASES["all_to_one"](T, E, K)
    cfg = MoEConfig(d_model=D, d_ff=4, num_experts=E, top_k=K, capacity_factor=1.0,
                    pad_to_capacity=pad)  # fmt: skip
    disp = LocalDispatcher(cfg)
    w = torch.rand(T, K, requires_grad=True)
    x_MD, rows_E, ctx = disp.dispatch(torch.randn(T, D), idx, w)
    y = torch.randn(x_MD.shape[0], D, requires_grad=True)  # padding rows hold junk
    g = torch.randn(T, D)
    (disp.combine(y, ctx) * g).sum().backward()
    # Plain autograd over the same gather, with padding rows forced to zero.
    y2 = y.detach().clone().requires_grad_()
    w2 = w.detach().clone().requires_grad_()
    kept = ctx.row_of_slot_N != x_MD.shape[0] - 1
    rows = torch.where(kept, ctx.row_of_slot_N, 0)
    picked = y2[rows] * kept.unsqueeze(1)
    ref = (picked.view(T, K, D) * w2.unsqueeze(-1)).sum(1)
    (ref * g).sum().backward()
    torch.testing.assert_close(w.grad, w2.grad)
    torch.testing.assert_close(y.grad, y2.grad)
    real_rows = torch.zeros(x_MD.shape[0], dtype=torch.bool)
    real_rows[ctx.row_of_slot_N[kept]] = True
    assert torch.count_nonzero(y.grad[~real_rows]) == 0
