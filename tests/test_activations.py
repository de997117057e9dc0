"""Activation memory: the analytic count (xpar.plan.activations) against what autograd saves
(xpar.plan.measure) on tiny CPU models, per block and in total, for every recompute mode, fp32
and bf16 autocast, both dispatchers; recompute holds much less on a wide-FFN model; measuring
leaves the model as it was."""

from __future__ import annotations

from dataclasses import replace
from functools import cache

import pytest
import torch

from xpar.model import ModelConfig, MoETransformerLM
from xpar.model.config import deepseek_v3, tiny
from xpar.model.mla import MLAConfig
from xpar.moe import MoEConfig
from xpar.parallel.dispatcher import AllToAllDispatcher
from xpar.plan.activations import ActivationBytes, activation_bytes
from xpar.plan.measure import measure_activations

# The count is exact for dropless routing; with capacity it keeps every slot up to E *
# capacity, while a random router at init drops a few more (about 1% of the bytes here).
TOLERANCE = 0.02
B, S = 2, 32


def _wide_ffn() -> ModelConfig:
    """Experts 8x wider than the model, top-2, a dense first layer."""
    moe = MoEConfig(d_model=64, d_ff=512, num_experts=8, top_k=2)
    return ModelConfig(
        vocab_size=256, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=128,
        max_seq_len=64, moe=moe, first_k_dense=1,
    )  # fmt: skip


def _two_level() -> ModelConfig:
    """Learned two-level sigmoid routing with expert and group capacity, a gated shared
    expert, per-head QK norm, q/k/v biases, tied embeddings."""
    moe = MoEConfig(
        d_model=64, d_ff=32, num_experts=8, top_k=2, router="two_level", num_groups=4,
        top_groups=2, group_score="learned", score_func="sigmoid", norm_topk_prob=True,
        route_scale=2.0, capacity_factor=1.25, group_capacity_factor=1.5,
        num_shared_experts=1, shared_expert_gate=True,
    )  # fmt: skip
    return ModelConfig(
        vocab_size=256, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=128,
        max_seq_len=64, moe=moe, qk_norm="head", attn_bias=True, tie_embeddings=True,
        first_k_dense=1,
    )  # fmt: skip


def _padded() -> ModelConfig:
    """Group-limited (topk_sum) top-3 routing padded to capacity, two shared experts, full QK
    norm."""
    moe = MoEConfig(
        d_model=64, d_ff=32, num_experts=8, top_k=3, router="two_level", num_groups=4,
        top_groups=2, group_score="topk_sum", score_func="sigmoid", norm_topk_prob=True,
        capacity_factor=1.0, pad_to_capacity=True, num_shared_experts=2,
    )  # fmt: skip
    return ModelConfig(
        vocab_size=128, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=64, moe=moe,
        qk_norm="full",
    )  # fmt: skip


def _mla() -> ModelConfig:
    """Multi-head latent attention with a q latent and v_head_dim != qk_head_dim (CPU SDPA
    falls back to its math kernel), a shared expert, a dense first layer."""
    mla = MLAConfig(
        q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6
    )
    moe = MoEConfig(d_model=64, d_ff=32, num_experts=8, top_k=2, num_shared_experts=1)
    return ModelConfig(
        vocab_size=256, d_model=64, n_layers=3, n_heads=4, d_ff=128, max_seq_len=64, moe=moe,
        mla=mla, first_k_dense=1,
    )  # fmt: skip


def _mla_fused() -> ModelConfig:
    """MLA with equal head dims (CPU SDPA's flash kernel), full-rank q, halves-rotary."""
    mla = MLAConfig(
        q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=12, rope_interleave=False,
    )  # fmt: skip
    moe = MoEConfig(d_model=64, d_ff=32, num_experts=8, top_k=2, score_func="sigmoid")
    return ModelConfig(
        vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=64, moe=moe,
        mla=mla,
    )  # fmt: skip


SHAPES = {
    "tiny": tiny,
    "wide_ffn": _wide_ffn,
    "two_level": _two_level,
    "padded": _padded,
    "mla": _mla,
    "mla_fused": _mla_fused,
}
MODES = [("none", 1), ("experts", 1), ("experts", 2), ("full", 1), ("full", 2)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Matmuls this small gain nothing from threads, which on a busy 2-core machine only
    contend (an expert loop ran 50x slower with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@cache
def _model(shape: str) -> tuple[MoETransformerLM, torch.Tensor]:
    torch.manual_seed(0)
    cfg = SHAPES[shape]()
    tokens_BL = torch.randint(
        0, cfg.vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(1)
    )
    return MoETransformerLM(cfg), tokens_BL


def _cpu_attention(cfg: ModelConfig) -> str:
    """The SDPA kernel torch picks on CPU: flash unless MLA's q/k and v head dims differ."""
    mla = cfg.mla
    return "math" if mla is not None and mla.qk_head_dim != mla.v_head_dim else "fused"


def _errors(planned: ActivationBytes, measured: ActivationBytes) -> tuple[list[float], float]:
    """Relative errors of each block (then outside) and of the total."""
    pairs = zip(
        [*planned.per_layer, planned.outside], [*measured.per_layer, measured.outside], strict=True
    )
    parts = [(p - m) / m for p, m in pairs]
    return parts, (planned.total - measured.total) / measured.total


def _compare(shape: str, mode: str, every: int, precision: str, **kw) -> None:
    model, tokens_BL = _model(shape)
    model.set_recompute(mode, every)
    dtype = torch.bfloat16 if precision == "bf16" else None
    measured = measure_activations(model, tokens_BL, autocast_dtype=dtype)
    attention = _cpu_attention(model.cfg)
    planned = activation_bytes(model.cfg, B, S, mode, every, precision, attention=attention, **kw)
    parts, total = _errors(planned, measured)
    print(
        f"{shape} {precision} recompute={mode}/{every} {kw or ''}: measured {measured.total}, "
        f"planned {planned.total}, total {total:+.2%}, worst part {max(map(abs, parts)):.2%}"
    )
    assert abs(total) <= TOLERANCE
    assert max(map(abs, parts)) <= TOLERANCE, (planned, measured)


@pytest.mark.parametrize("mode,every", MODES, ids=[f"{m}-{e}" for m, e in MODES])
@pytest.mark.parametrize("shape", SHAPES)
def test_planned_matches_measured_fp32(shape, mode, every):
    _compare(shape, mode, every, "fp32")


@pytest.mark.parametrize("mode", ["none", "experts", "full"])
@pytest.mark.parametrize("shape", ["tiny", "two_level", "mla", "mla_fused"])
def test_planned_matches_measured_bf16_autocast(shape, mode):
    _compare(shape, mode, 1, "bf16")


@pytest.mark.parametrize("dedup", [False, True])
@pytest.mark.parametrize("shape", ["wide_ffn", "mla"])
def test_planned_matches_measured_all_to_all_dispatcher(shape, dedup):
    """The all-to-all dispatcher in one process (a group of one: every row stays here), as
    data-parallel training runs it at ep_size 1."""
    model, _ = _model(shape)
    local = [layer.dispatcher for layer in model.moe_layers()]
    try:
        for layer in model.moe_layers():
            layer.dispatcher = AllToAllDispatcher(layer.cfg, None, 1, dedup=dedup)
        for mode in ("none", "experts"):
            _compare(shape, mode, 1, "fp32", dedup=dedup, all_to_all=True)
    finally:
        for layer, dispatcher in zip(model.moe_layers(), local, strict=True):
            layer.dispatcher = dispatcher


def test_recompute_holds_less_on_a_wide_ffn():
    model, tokens_BL = _model("wide_ffn")
    held = {}
    for mode in ("none", "experts", "full"):
        model.set_recompute(mode)
        held[mode] = measure_activations(model, tokens_BL)
    ratios = {mode: held[mode].total / held["none"].total for mode in ("experts", "full")}
    print(f"held for backward, relative to recompute=none ({held['none'].total} bytes): {ratios}")
    assert ratios["experts"] < 0.4  # the [T*K, F] SwiGLU tensors are most of it
    assert ratios["full"] < 0.15  # the blocks' inputs and the loss's log-softmax
    moe_layer = model.cfg.moe_layer_ids()[0]
    blocks = {mode: held[mode].per_layer[moe_layer] for mode in held}
    assert blocks["full"] < blocks["experts"] < blocks["none"] / 4


def test_measuring_leaves_the_model_as_it_was():
    cfg = tiny()  # a balancing bias (its load tally is a buffer) and jitter (it draws)
    cfg.moe = replace(cfg.moe, bias_update_rate=0.01, jitter_eps=0.1)
    model = MoETransformerLM(cfg).eval()
    model.set_recompute("full")
    tokens_BL = torch.randint(0, cfg.vocab_size, (B, S + 1))
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()
    first = measure_activations(model, tokens_BL)
    assert first == measure_activations(model, tokens_BL)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert torch.equal(torch.get_rng_state(), rng)


def test_deepseek_v3_is_planned_without_building_it():
    cfg = deepseek_v3()
    held = {
        mode: activation_bytes(cfg, 1, 4096, mode, precision="bf16", ep_size=8, dedup=True)
        for mode in ("none", "experts", "full")
    }
    assert all(len(h.per_layer) == cfg.n_layers for h in held.values())
    assert held["full"].total < held["experts"].total < held["none"].total
    dense, moe = held["none"].per_layer[0], held["none"].per_layer[cfg.first_k_dense]
    assert held["full"].per_layer[0] == 4 * 4096 * cfg.d_model  # the block's fp32 input
    assert dense < moe


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"recompute": "some"}, "trainer.recompute"),
        ({"recompute_layers": 0}, "trainer.recompute_layers"),
        ({"precision": "fp8"}, "trainer.precision"),
        ({"ep_size": 3}, "parallel.ep_size=3"),
        ({"seq_len": 4096}, "model.max_seq_len"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, match):
    args = {"micro_batch": 2, "seq_len": 32, **kwargs}
    with pytest.raises(ValueError, match=match):
        activation_bytes(tiny(), **args)
