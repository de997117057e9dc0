"""GroupedExperts: the grouped-GEMM path equals the loop path; padding rows stay finite and,
given zero weight downstream, touch no gradient."""

import pytest
import torch
import torch.nn.functional as F

from xpar.moe import GroupedExperts


def _naive(ex, x, counts):
    out, start = [], 0
    for e, n in enumerate(counts):
        xe = x[start : start + n]
        out.append((F.silu(xe @ ex.w1[e].T) * (xe @ ex.w3[e].T)) @ ex.w2[e].T)
        start += n
    return torch.cat(out)


def _run(ex, x, counts, g):
    x = x.clone().requires_grad_()
    y = ex(x, torch.tensor(counts))
    (y.float() * g).sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in ex.parameters()]
    ex.zero_grad()
    return y, grads


@pytest.mark.parametrize("counts", [[3, 0, 7, 2], [12, 0, 0, 0], [0, 0, 0, 5]])
def test_loop_matches_naive_fp32_and_pads_with_zeros(counts):
    ex = GroupedExperts(4, 8, 16, impl="loop")
    n = sum(counts)
    x = torch.randn(n + 3, 8)  # three trailing padding rows
    y = ex(x, torch.tensor(counts))
    torch.testing.assert_close(y[:n], _naive(ex, x, counts))
    assert torch.count_nonzero(y[n:]) == 0


@pytest.mark.parametrize("counts", [[3, 0, 7, 2], [12, 0, 0, 0], [0, 2, 0, 0]])
def test_grouped_mm_matches_loop_in_bf16(counts):
    # CPU grouped_mm runs bf16 only; the same code path runs on CUDA.
    ex = GroupedExperts(4, 16, 32, impl="grouped_mm").to(torch.bfloat16)
    n = sum(counts)
    x = torch.randn(n + 4, 16, dtype=torch.bfloat16)
    g = torch.randn(n + 4, 16)
    g[n:] = 0  # the dispatcher gives padding rows zero weight
    y_g, grads_g = _run(ex, x, counts, g)
    ex.impl = "loop"
    y_l, grads_l = _run(ex, x, counts, g)
    assert torch.isfinite(y_g).all()  # the kernel's unwritten rows never leak out
    torch.testing.assert_close(y_g[:n], y_l[:n], rtol=2e-2, atol=2e-2)
    for a, b in zip(grads_g, grads_l, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2)
    assert torch.count_nonzero(grads_g[0][n:]) == 0


def test_auto_uses_grouped_mm_only_for_cuda_bf16():
    ex = GroupedExperts(2, 4, 4)
    assert not ex.use_grouped_mm(torch.zeros(1, 4))
    assert not ex.use_grouped_mm(torch.zeros(1, 4, dtype=torch.bfloat16))


def test_compute_dtype_follows_autocast():
    x = torch.zeros(1, 4)
    assert GroupedExperts.compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert GroupedExperts.compute_dtype(x) == torch.bfloat16


@pytest.mark.gpu
def test_fp32_input_under_cuda_autocast_takes_grouped_mm():
    ex = GroupedExperts(4, 64, 128).cuda()
    counts = torch.tensor([5, 0, 9, 2], device="cuda")
    x = torch.randn(20, 64, device="cuda")
    y_ref = ex(x, counts)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert ex.use_grouped_mm(x)
        y = ex(x, counts)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y[:16].float(), y_ref[:16], rtol=3e-2, atol=3e-2)


@pytest.mark.gpu
def test_grouped_mm_on_cuda_matches_fp32_loop():
    ex = GroupedExperts(8, 128, 256).cuda()
    counts = [40, 0, 3, 100, 17, 0, 64, 9]
    n = sum(counts)
    x = torch.randn(n + 8, 128, device="cuda")
    y_ref = ex(x, torch.tensor(counts, device="cuda"))  # fp32: loop path
    y = ex(x.bfloat16(), torch.tensor(counts, device="cuda"))
    assert ex.use_grouped_mm(x.bfloat16())
    torch.testing.assert_close(y[:n].float(), y_ref[:n], rtol=3e-2, atol=3e-2)
    assert torch.isfinite(y).all()
