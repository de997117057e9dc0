"""Dropless MoELayer == a naive per-token reference: outputs and every gradient, fp32."""

import pytest
import torch

from xpar.moe import MoEConfig, MoELayer

from moe_reference import reference_forward

ROUTINGS = [
    dict(router="topk"),
    dict(router="topk", score_func="sigmoid", norm_topk_prob=True, route_scale=2.5),
    dict(router="two_level", num_groups=4, top_groups=2, group_score="learned"),
    dict(router="two_level", num_groups=4, top_groups=2, group_score="topk_sum"),
    dict(
        router="two_level",
        num_groups=4,
        top_groups=2,
        group_score="topk_sum",
        score_func="sigmoid",
        norm_topk_prob=True,
    ),
]


def _grads(module, x):
    return [x.grad.clone()] + [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("routing", ROUTINGS, ids=lambda r: "-".join(map(str, r.values())))
@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("shared", [0, 1])
def test_dropless_layer_matches_per_token_reference(routing, top_k, shared):
    cfg = MoEConfig(
        d_model=12, d_ff=20, num_experts=8, top_k=top_k, num_shared_experts=shared, **routing
    )
    layer = MoELayer(cfg)
    with torch.no_grad():  # visible, unequal biases so selection != weights ordering
        layer.router.expert_bias.copy_(torch.linspace(-0.05, 0.05, 8))
    x = torch.randn(3, 7, 12)
    g = torch.randn(3, 7, 12)

    x1 = x.clone().requires_grad_()
    out, _ = layer(x1)
    (out * g).sum().backward()
    got = _grads(layer, x1)
    layer.zero_grad()

    x2 = x.clone().requires_grad_()
    ref = reference_forward(layer, x2)
    (ref * g).sum().backward()
    want = _grads(layer, x2)

    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"grad of {name}")


def test_idle_experts_get_zero_not_none_gradients():
    cfg = MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=1)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[2, 0] = 10.0  # every token with x[0] > 0 goes to expert 2
    x = torch.randn(16, 8).abs()
    out, _ = layer(x)
    out.sum().backward()
    for w in (layer.experts.w1, layer.experts.w2, layer.experts.w3):
        assert w.grad is not None
        assert torch.count_nonzero(w.grad[[0, 1, 3]]) == 0
        assert torch.count_nonzero(w.grad[2]) > 0


@pytest.mark.parametrize("cf", [None, 1.0])
def test_an_empty_batch_gives_an_empty_output_and_zero_gradients(cf):
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2, capacity_factor=cf))
    x = torch.randn(0, 8, requires_grad=True)
    out, aux = layer(x)
    out.sum().backward()
    assert out.shape == (0, 8) and x.grad.shape == (0, 8)
    assert aux.tokens_per_expert.sum() == 0
    for w in (layer.experts.w1, layer.experts.w2, layer.experts.w3):
        assert w.grad is not None and torch.count_nonzero(w.grad) == 0


def test_accepts_tokens_or_batches():
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2))
    x = torch.randn(2, 5, 8)
    out3, _ = layer(x)
    out2, _ = layer(x.view(10, 8))
    assert out3.shape == (2, 5, 8)
    torch.testing.assert_close(out3.view(10, 8), out2, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("routing", ROUTINGS[:1] + ROUTINGS[3:4], ids=["topk", "two_level"])
@pytest.mark.parametrize("cf", [None, 1.25])
def test_cuda_bf16_layer_matches_fp32_cpu_and_never_syncs(routing, cf):
    cfg = MoEConfig(d_model=256, d_ff=512, num_experts=8, top_k=2, capacity_factor=cf, **routing)
    cpu = MoELayer(cfg)
    with torch.no_grad():  # bf16-representable weights and input: both route identically
        for p in cpu.parameters():
            p.copy_(p.bfloat16().float())
    gpu = MoELayer(cfg).cuda().bfloat16()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(512, 256).bfloat16().float()
    ref, _ = cpu(x)
    xg = x.cuda().bfloat16().requires_grad_()
    out, aux = gpu(xg)  # warm-up: kernels load, allocator grows
    out.float().square().mean().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host-device sync now raises
    try:
        out, aux = gpu(xg)
        (out.float().square().mean() + aux.loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(out.float().cpu(), ref, rtol=5e-2, atol=5e-2)
