"""Multi-head latent attention: shapes, causality, both query paths, rotary layouts, config
errors, and the LM built with it (param counts, GQA tables untouched)."""

import dataclasses

import pytest
import torch

from xpar.model import ModelConfig, MoETransformerLM, count_params, get_preset, rope_cos_sin
from xpar.model.mla import MLAConfig, MLAttention, apply_rope


def mla_model(**mla_changes) -> ModelConfig:
    mla = MLAConfig(q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4)
    mla = dataclasses.replace(mla, v_head_dim=6, **mla_changes)
    return dataclasses.replace(get_preset("tiny"), n_kv_heads=None, mla=mla)


def attn_and_tables(cfg: ModelConfig, seq_len: int = 10):
    torch.manual_seed(0)
    attn = MLAttention(cfg)
    attn.reset_parameters(0.2, out_std=0.2)
    cos_SR, sin_SR = rope_cos_sin(cfg.mla.qk_rope_head_dim, seq_len, cfg.rope_theta)
    return attn, cos_SR, sin_SR


@pytest.mark.parametrize("q_lora_rank", [None, 24], ids=["full_q", "low_rank_q"])
@pytest.mark.parametrize("interleave", [False, True], ids=["halves", "interleaved"])
def test_shapes_and_causality(q_lora_rank, interleave):
    cfg = mla_model(q_lora_rank=q_lora_rank, rope_interleave=interleave)
    attn, cos_SR, sin_SR = attn_and_tables(cfg)
    x_BSD = torch.randn(2, 10, cfg.d_model)
    y_BSD = attn(x_BSD, cos_SR, sin_SR)
    assert y_BSD.shape == x_BSD.shape
    x2_BSD = x_BSD.clone()
    x2_BSD[:, 6:] = torch.randn(2, 4, cfg.d_model)
    y2_BSD = attn(x2_BSD, cos_SR, sin_SR)
    torch.testing.assert_close(y2_BSD[:, :6], y_BSD[:, :6])
    assert not torch.allclose(y2_BSD[:, 6:], y_BSD[:, 6:])


def test_state_dict_names_per_query_path():
    full = MLAttention(mla_model(q_lora_rank=None)).state_dict()
    low = MLAttention(mla_model()).state_dict()
    kv = {"wkv_a.weight": (16 + 4, 64), "kv_norm.weight": (16,), "wkv_b.weight": (4 * 14, 16)}
    kv["wo.weight"] = (64, 4 * 6)
    assert {k: tuple(v.shape) for k, v in full.items()} == {"wq.weight": (4 * 12, 64), **kv}
    q = {"wq_a.weight": (24, 64), "q_norm.weight": (24,), "wq_b.weight": (4 * 12, 24)}
    assert {k: tuple(v.shape) for k, v in low.items()} == {**q, **kv}


def test_matches_explicit_attention():
    """Per-head scores q_h·k_h / sqrt(C) with the rotary key shared by every head."""
    cfg = mla_model(q_lora_rank=None, rope_interleave=False)
    attn, cos_SR, sin_SR = attn_and_tables(cfg, seq_len=5)
    x_SD = torch.randn(5, cfg.d_model)
    H, N, R, U, L = 4, 8, 4, 6, 16
    q_SHC = attn.wq(x_SD).view(5, H, N + R)
    latent_SL, k_rope_SR = attn.wkv_a(x_SD).split([L, R], -1)
    kv_SHY = attn.wkv_b(attn.kv_norm(latent_SL)).view(5, H, N + U)
    rope = lambda t: apply_rope(t[None, None], cos_SR, sin_SR, False)[0, 0]  # noqa: E731
    out_SHU = torch.empty(5, H, U)
    for h in range(H):
        q_SC = torch.cat([q_SHC[:, h, :N], rope(q_SHC[:, h, N:])], -1)
        k_SC = torch.cat([kv_SHY[:, h, :N], rope(k_rope_SR)], -1)
        scores_SS = (q_SC @ k_SC.T) / (N + R) ** 0.5
        scores_SS = scores_SS.masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))
        out_SHU[:, h] = scores_SS.softmax(-1) @ kv_SHY[:, h, N:]
    expected_SD = attn.wo(out_SHU.flatten(1))
    torch.testing.assert_close(attn(x_SD[None], cos_SR, sin_SR)[0], expected_SD)


def test_interleaved_rope_is_a_permuted_halves_rope():
    """Rotating pairs (x0, x1), (x2, x3) equals de-interleaving, then rotating the halves."""
    cos_SR, sin_SR = rope_cos_sin(8, 6, 10000.0)
    x_BHSR = torch.randn(1, 2, 6, 8)
    deinterleaved = torch.cat([x_BHSR[..., 0::2], x_BHSR[..., 1::2]], -1)
    torch.testing.assert_close(
        apply_rope(x_BHSR, cos_SR, sin_SR, True), apply_rope(deinterleaved, cos_SR, sin_SR, False)
    )


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_lm_param_count_and_rope_tables(q_lora_rank):
    cfg = mla_model(q_lora_rank=q_lora_rank)
    model = MoETransformerLM(cfg)
    assert count_params(cfg).total == sum(p.numel() for p in model.parameters())
    assert model.rope_cos.shape == (cfg.max_seq_len, 4)  # MLA's rotary dim, not d_model / H
    out = model(torch.randint(0, 256, (2, 12)), torch.randint(0, 256, (2, 12)))
    assert out.logits.shape == (2, 12, 256) and out.loss.isfinite()


def test_gqa_rope_tables_unchanged():
    cfg = get_preset("tiny")
    assert cfg.rope_dim == cfg.head_dim == 16


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kv_lora_rank": 0}, "model.mla.kv_lora_rank=0 must be >= 1"),
        ({"q_lora_rank": 0}, "model.mla.q_lora_rank=0 must be >= 1"),
        ({"qk_rope_head_dim": 6 - 1}, "model.mla.qk_rope_head_dim=5 must be even"),
        ({"v_head_dim": 0}, "model.mla.v_head_dim=0 must be >= 1"),
    ],
)
def test_mla_config_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        MLAConfig(**changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_kv_heads": 2}, r"model.n_kv_heads=2 does not apply to multi-head latent"),
        ({"attn_head_dim": 32}, r"model.attn_head_dim=32 does not apply .* leave it unset"),
        ({"qk_norm": "head"}, r"model.qk_norm='head' does not apply"),
        ({"attn_bias": True}, r"model.attn_bias=True does not apply"),
    ],
)
def test_gqa_options_refused_with_mla(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(mla_model(), **changes)


def test_mla_ignores_gqa_head_dim_rules():
    # 64 / 6 heads is no whole head dim; MLA does not use it.
    cfg = dataclasses.replace(mla_model(), n_heads=6, n_kv_heads=None)
    assert MoETransformerLM(cfg)(torch.randint(0, 256, (1, 4))).logits.shape == (1, 4, 256)


def test_mla_section_from_a_dict():
    cfg = dataclasses.replace(mla_model(), mla=dataclasses.asdict(mla_model().mla))
    assert cfg.mla == mla_model().mla
