"""MoETransformerLM and ModelConfig: param counts, loss, causality, rotary, presets, errors."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from xpar.model import (
    PRESETS,
    ModelConfig,
    MoETransformerLM,
    apply_rotary,
    count_params,
    flops_per_token,
    get_preset,
    rope_cos_sin,
    summary,
)
from xpar.moe import MoEConfig, MoELayer, SwiGLU


def tiny(**changes) -> ModelConfig:
    return dataclasses.replace(get_preset("tiny"), **changes)


def tiny_moe(**changes) -> MoEConfig:
    return dataclasses.replace(get_preset("tiny").moe, **changes)


VARIANTS = {
    "untied": tiny(),
    "tied": tiny(tie_embeddings=True),
    "shared": tiny(moe=tiny_moe(num_shared_experts=2)),
    "shared_d_ff": tiny(moe=tiny_moe(num_shared_experts=1, shared_d_ff=96)),
    "first_k_dense": tiny(first_k_dense=1, moe_every=2, tie_embeddings=True),
    "two_level": tiny(moe=tiny_moe(router="two_level", num_groups=4, top_groups=2)),
    "two_level_topk_sum": tiny(
        moe=tiny_moe(router="two_level", num_groups=4, top_groups=2, group_score="topk_sum")
    ),
    "dense": tiny(moe=None),
    "mha": tiny(n_kv_heads=4),
    "qk_norm_head": tiny(qk_norm="head", attn_head_dim=32),
    "qk_norm_full": tiny(qk_norm="full"),
    "attn_bias": tiny(attn_bias=True),
    "shared_gate": tiny(moe=tiny_moe(num_shared_experts=1, shared_expert_gate=True)),
}


@pytest.mark.parametrize("cfg", VARIANTS.values(), ids=VARIANTS.keys())
def test_param_count_matches_model(cfg):
    model = MoETransformerLM(cfg)
    counted = count_params(cfg)
    assert counted.total == sum(p.numel() for p in model.parameters()) == model.num_params()
    assert counted.total_non_embedding == model.num_params(exclude_embedding=True)


def test_active_params_by_hand():
    # tiny: V=256, D=64, 4 layers, 4 heads / 2 KV heads of dim 16, 8 experts top-2, F=64.
    attn = 64 * 64 + 2 * 64 * 32 + 64 * 64  # wq, wk, wv, wo
    norms = 2 * 64
    router = 8 * 64
    two_experts = 2 * 3 * 64 * 64
    embedding = 2 * 256 * 64  # untied: embedding + head
    active = embedding + 4 * (attn + norms + router + two_experts) + 64  # + final norm
    counted = count_params(tiny())
    assert counted.active == active == 182_848
    assert counted.embedding == embedding
    assert counted.total == active + 4 * 6 * 3 * 64 * 64  # the 6 experts not chosen


def test_initial_loss_is_log_vocab():
    torch.manual_seed(0)
    model = MoETransformerLM(tiny())
    tokens_BS = torch.randint(0, 256, (8, 64))
    targets_BS = torch.randint(0, 256, (8, 64))
    with torch.no_grad():
        loss = model(tokens_BS, targets_BS).loss
    assert abs(loss.item() - math.log(256)) < 0.1


def test_shapes_and_causality():
    model = MoETransformerLM(tiny()).eval()
    tokens_BS = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        out = model(tokens_BS)
        j = 9
        changed_BS = tokens_BS.clone()
        changed_BS[:, j] = (changed_BS[:, j] + 1) % 256
        out2 = model(changed_BS)
    assert out.logits.shape == (2, 16, 256)
    assert out.loss is None
    torch.testing.assert_close(out.logits[:, :j], out2.logits[:, :j])
    assert not torch.allclose(out.logits[:, j:], out2.logits[:, j:])


def test_loss_and_aux_loss():
    model = MoETransformerLM(tiny(first_k_dense=1))
    tokens_BS = torch.randint(0, 256, (2, 16))
    targets_BS = torch.randint(0, 256, (2, 16))
    targets_BS[0, :5] = -100
    out = model(tokens_BS, targets_BS)
    expected = F.cross_entropy(out.logits.reshape(-1, 256), targets_BS.flatten())
    torch.testing.assert_close(out.loss, expected)
    assert len(out.aux) == len(model.moe_layers()) == 3
    torch.testing.assert_close(out.aux_loss, sum(a.loss for a in out.aux))
    assert out.aux_loss.requires_grad and out.aux_loss.item() > 0
    torch.testing.assert_close(out.total_loss, out.loss + out.aux_loss)

    dense = MoETransformerLM(tiny(moe=None))(tokens_BS, targets_BS)
    assert dense.aux == [] and dense.aux_loss.item() == 0.0


def test_overfits_fixed_batch():
    torch.manual_seed(0)
    model = MoETransformerLM(tiny(n_layers=2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens_BS = torch.randint(0, 256, (4, 32))
    targets_BS = torch.randint(0, 256, (4, 32))
    losses = []
    for _ in range(30):
        out = model(tokens_BS, targets_BS)
        opt.zero_grad()
        out.total_loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 1.0


BAD = [
    (dict(vocab_size=0), r"model\.vocab_size=0 must be >= 1"),
    (dict(d_model=100, n_heads=3), r"model\.d_model=100 is not divisible by model\.n_heads=3"),
    (dict(d_model=36, n_heads=4, moe=None), r"model\.d_model=36 / model\.n_heads=4 .* even"),
    (dict(n_heads=4, n_kv_heads=3), r"model\.n_heads=4 is not divisible by model\.n_kv_heads=3"),
    (dict(n_kv_heads=0), r"model\.n_kv_heads=0 must be >= 1"),
    (dict(n_layers=0), r"model\.n_layers=0 must be >= 1"),
    (dict(d_ff=0), r"model\.d_ff=0 must be >= 1"),
    (dict(max_seq_len=0), r"model\.max_seq_len=0 must be >= 1"),
    (dict(rope_theta=0.0), r"model\.rope_theta=0\.0 must be > 0"),
    (dict(norm_eps=-1e-5), r"model\.norm_eps=-1e-05 must be > 0"),
    (dict(init_std=0.0), r"model\.init_std=0\.0 must be > 0"),
    (dict(moe_every=0), r"model\.moe_every=0 must be >= 1"),
    (dict(first_k_dense=-1), r"model\.first_k_dense=-1 must be >= 0"),
    (dict(first_k_dense=5), r"model\.first_k_dense=5 must be in \[0, n_layers=4\]"),
    (dict(first_k_dense=4), r"model\.first_k_dense=4 and model\.moe_every=1 leave no MoE"),
    (dict(moe_every=5), r"model\.first_k_dense=0 and model\.moe_every=5 leave no MoE"),
    (dict(qk_norm="layer"), r"model\.qk_norm='layer' is not one of \['none', 'head', 'full'\]"),
    (dict(attn_head_dim=15), r"model\.attn_head_dim=15 must be even"),
    (dict(attn_head_dim=0), r"model\.attn_head_dim=0 must be >= 1"),
    (
        dict(moe=MoEConfig(d_model=32, d_ff=64, num_experts=8)),
        r"model\.moe\.d_model=32 does not match model\.d_model=64",
    ),
]


@pytest.mark.parametrize("changes,message", BAD, ids=[m.split("=")[0][7:] for _, m in BAD])
def test_invalid_config_names_field(changes, message):
    with pytest.raises(ValueError, match=message):
        tiny(**changes)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match=r"'llama'.*deepseek_v3.*tiny"):
        get_preset("llama")


@pytest.mark.parametrize("name", PRESETS)
def test_presets_are_valid(name):
    cfg = get_preset(name)
    assert isinstance(cfg, ModelConfig) and cfg.moe is not None
    p = count_params(cfg)
    assert 0 < p.embedding < p.active < p.total
    assert flops_per_token(cfg, 4096) > 6 * p.active_non_embedding
    assert "params: total" in summary(cfg, 4096)


def test_published_param_counts():
    mixtral, olmoe = (
        count_params(get_preset("mixtral_8x7b")),
        count_params(get_preset("olmoe_1b_7b")),
    )
    assert mixtral.total == pytest.approx(46.7e9, rel=0.02)
    assert mixtral.active == pytest.approx(12.9e9, rel=0.03)
    assert olmoe.total == pytest.approx(6.9e9, rel=0.05)
    assert olmoe.active == pytest.approx(1.3e9, rel=0.10)


@pytest.mark.parametrize(
    "name,total,active", [("deepseek_v3", 671e9, 37e9), ("deepseek_v2_lite", 15.7e9, 2.4e9)]
)
def test_deepseek_presets_match_published_counts(name, total, active):
    # DeepSeek's "activated" leaves out the input embedding (the Mixtral/OLMoE figures, and
    # ours, include it).
    cfg = get_preset(name)
    assert cfg.mla is not None
    p = count_params(cfg)
    assert p.total == pytest.approx(total, rel=0.01)
    assert p.active - cfg.vocab_size * cfg.d_model == pytest.approx(active, rel=0.03)


@pytest.mark.parametrize(
    "n_layers,first_k_dense,moe_every,moe_ids",
    [(4, 0, 1, [0, 1, 2, 3]), (8, 0, 2, [1, 3, 5, 7]), (8, 2, 3, [4, 7]), (5, 3, 1, [3, 4])],
)
def test_moe_layer_placement(n_layers, first_k_dense, moe_every, moe_ids):
    cfg = tiny(n_layers=n_layers, first_k_dense=first_k_dense, moe_every=moe_every)
    assert cfg.moe_layer_ids() == moe_ids
    model = MoETransformerLM(cfg)
    for i, block in enumerate(model.layers):
        assert isinstance(block.ffn, MoELayer if i in moe_ids else SwiGLU)
    assert len(model.moe_layers()) == len(moe_ids)
    assert get_preset("deepseek_v3").moe_layer_ids() == list(range(3, 61))


def test_rotary_scores_depend_on_relative_position():
    cos_SC, sin_SC = rope_cos_sin(head_dim=16, seq_len=64, theta=10000.0)
    q_C, k_C = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    cos_SC, sin_SC = cos_SC.double(), sin_SC.double()

    def score(m, n):
        rotated = apply_rotary(q_C, cos_SC[m], sin_SC[m]) @ apply_rotary(k_C, cos_SC[n], sin_SC[n])
        return rotated.item()

    for m, n, c in [(5, 2, 7), (0, 9, 30), (40, 40, 3)]:
        assert score(m, n) == pytest.approx(score(m + c, n + c), rel=1e-5, abs=1e-6)
    assert score(5, 2) != pytest.approx(score(5, 3))


def test_state_dict_names():
    untied = MoETransformerLM(tiny(moe=tiny_moe(num_shared_experts=1), first_k_dense=1))
    keys = set(untied.state_dict())
    assert {"embed.weight", "norm.weight", "lm_head.weight", "layers.0.ffn.w2.weight"} <= keys
    assert {"layers.1.attn.wk.weight", "layers.1.ffn.router.gate.weight"} <= keys
    assert {"layers.1.ffn.experts.w1", "layers.1.ffn.shared_expert.w2.weight"} <= keys
    assert not any("rope" in k for k in keys)
    assert "lm_head.weight" not in MoETransformerLM(tiny(tie_embeddings=True)).state_dict()


def test_init_scales_output_projections():
    torch.manual_seed(0)
    model = MoETransformerLM(tiny(n_layers=8, init_std=0.05, moe=tiny_moe(init_std=0.05)))
    out_std = 0.05 / math.sqrt(16)
    block = model.layers[0]
    assert block.attn.wq.weight.std().item() == pytest.approx(0.05, rel=0.1)
    assert block.attn.wo.weight.std().item() == pytest.approx(out_std, rel=0.1)
    assert block.ffn.experts.w1.std().item() == pytest.approx(0.05, rel=0.1)
    assert block.ffn.experts.w2.std().item() == pytest.approx(out_std, rel=0.1)
    assert torch.all(block.ffn.router.expert_bias == 0)


def test_update_expert_bias():
    model = MoETransformerLM(tiny(moe=tiny_moe(bias_update_rate=0.01)))
    model(torch.randint(0, 256, (2, 16)))
    model.update_expert_bias()
    for layer in model.moe_layers():
        assert layer.router.expert_bias.abs().sum() > 0


def test_meta_device_build_then_init():
    with torch.device("meta"):
        model = MoETransformerLM(tiny())
    model.to_empty(device="cpu")
    model.init_weights()
    logits = model(torch.randint(0, 256, (1, 8))).logits
    assert torch.isfinite(logits).all()


def test_sequence_longer_than_max_seq_len_raises():
    model = MoETransformerLM(tiny(max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_matches_hf_mixtral():
    transformers = pytest.importorskip("transformers")
    cfg = tiny(moe=tiny_moe(norm_topk_prob=True), rope_theta=1e6)
    ours = MoETransformerLM(cfg).eval()
    hf_cfg = transformers.MixtralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=128, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False,
    )  # fmt: skip
    hf = transformers.MixtralForCausalLM(hf_cfg).eval()
    sd = {"model.embed_tokens.weight": ours.embed.weight, "model.norm.weight": ours.norm.weight}
    sd["lm_head.weight"] = ours.lm_head.weight
    for i, b in enumerate(ours.layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = b.attn_norm.weight
        sd[p + "post_attention_layernorm.weight"] = b.ffn_norm.weight
        for ours_name, hf_name in [("wq", "q"), ("wk", "k"), ("wv", "v"), ("wo", "o")]:
            sd[p + f"self_attn.{hf_name}_proj.weight"] = getattr(b.attn, ours_name).weight
        sd[p + "mlp.gate.weight"] = b.ffn.router.gate.weight
        sd[p + "mlp.experts.gate_up_proj"] = torch.cat([b.ffn.experts.w1, b.ffn.experts.w3], 1)
        sd[p + "mlp.experts.down_proj"] = b.ffn.experts.w2
    hf.load_state_dict(sd, strict=True)
    tokens_BS = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(
            ours(tokens_BS).logits, hf(tokens_BS).logits, atol=1e-5, rtol=1e-4
        )


def test_attention_variant_state_dict_names():
    names = set(MoETransformerLM(tiny(qk_norm="head", attn_bias=True)).state_dict())
    assert {"layers.0.attn.q_norm.weight", "layers.0.attn.k_norm.weight"} <= names
    assert {"layers.0.attn.wq.bias", "layers.0.attn.wk.bias", "layers.0.attn.wv.bias"} <= names
    assert "layers.0.attn.wo.bias" not in names
    model = MoETransformerLM(tiny(qk_norm="full", attn_head_dim=32))
    assert model.layers[0].attn.q_norm.weight.shape == (4 * 32,)  # H * C
    assert model.layers[0].attn.k_norm.weight.shape == (2 * 32,)  # G * C
    assert model.layers[0].attn.wq.weight.shape == (128, 64)
    assert MoETransformerLM(tiny(qk_norm="head")).layers[0].attn.q_norm.weight.shape == (16,)
    gated = MoETransformerLM(tiny(moe=tiny_moe(num_shared_experts=1, shared_expert_gate=True)))
    assert gated.state_dict()["layers.0.ffn.shared_gate.weight"].shape == (1, 64)


def test_defaults_keep_state_dict_and_init():
    """The new options off: the same names and, from one seed, the same weights as before."""
    names = set(MoETransformerLM(tiny()).state_dict())
    assert not any("norm.weight" in n and "attn." in n for n in names)
    assert not any(n.endswith(".bias") or "shared_gate" in n for n in names)
    torch.manual_seed(0)
    default = MoETransformerLM(tiny()).state_dict()
    torch.manual_seed(0)
    explicit = MoETransformerLM(
        tiny(
            qk_norm="none",
            attn_bias=False,
            attn_head_dim=16,
            moe=tiny_moe(shared_expert_gate=False),
        )
    ).state_dict()
    assert default.keys() == explicit.keys()
    assert all(torch.equal(default[k], explicit[k]) for k in default)


@pytest.mark.parametrize("qk_norm", ["head", "full"])
def test_qk_norm_makes_attention_blind_to_q_and_k_scale(qk_norm):
    """RMS-normalised q and k: scaling wq and wk leaves the output unchanged (up to eps)."""
    model = MoETransformerLM(tiny(qk_norm=qk_norm, norm_eps=1e-12, n_layers=1)).eval()
    tokens_BS = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        before = model(tokens_BS).logits
        model.layers[0].attn.wq.weight.mul_(7.0)
        model.layers[0].attn.wk.weight.mul_(0.3)
        after = model(tokens_BS).logits
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
        plain = MoETransformerLM(tiny(n_layers=1)).eval()
        plain.load_state_dict(model.state_dict(), strict=False)
        assert not torch.allclose(plain(tokens_BS).logits, before, atol=1e-4)


def test_qk_norm_head_normalises_each_head_before_rotary():
    cfg = tiny(qk_norm="head", n_layers=1)
    attn = MoETransformerLM(cfg).layers[0].attn
    with torch.no_grad():
        attn.q_norm.weight.copy_(torch.linspace(0.5, 2.0, 16))
        attn.k_norm.weight.copy_(torch.linspace(2.0, 0.5, 16))
    x_BSD = torch.randn(1, 5, 64)
    cos_SC, sin_SC = rope_cos_sin(16, 5, cfg.rope_theta)

    def per_head(x_BSX, n, norm):
        x_BSNC = x_BSX.view(1, 5, n, 16)
        x_BSNC = x_BSNC * torch.rsqrt(x_BSNC.square().mean(-1, keepdim=True) + cfg.norm_eps)
        return apply_rotary((x_BSNC * norm.weight).transpose(1, 2), cos_SC, sin_SC)

    q_BHSC = per_head(attn.wq(x_BSD), 4, attn.q_norm)
    k_BGSC = per_head(attn.wk(x_BSD), 2, attn.k_norm)
    v_BGSC = attn.wv(x_BSD).view(1, 5, 2, 16).transpose(1, 2)
    o_BHSC = F.scaled_dot_product_attention(q_BHSC, k_BGSC, v_BGSC, is_causal=True, enable_gqa=True)
    expected = attn.wo(o_BHSC.transpose(1, 2).reshape(1, 5, 64))
    torch.testing.assert_close(attn(x_BSD, cos_SC, sin_SC), expected)


def test_shared_expert_gate_scales_shared_expert():
    cfg = tiny_moe(num_shared_experts=1, shared_expert_gate=True)
    layer = MoELayer(cfg)
    ungated = MoELayer(dataclasses.replace(cfg, shared_expert_gate=False))
    ungated.load_state_dict(layer.state_dict(), strict=False)
    x_TD = torch.randn(10, 64)
    with torch.no_grad():
        routed_TD = ungated(x_TD)[0] - ungated.shared_expert(x_TD)
        gate_T1 = torch.sigmoid(x_TD @ layer.shared_gate.weight.T)
        expected = routed_TD + gate_T1 * layer.shared_expert(x_TD)
        torch.testing.assert_close(layer(x_TD)[0], expected)


def test_shared_expert_gate_needs_a_shared_expert():
    with pytest.raises(
        ValueError, match=r"moe\.shared_expert_gate=True .*moe\.num_shared_experts=0"
    ):
        tiny_moe(shared_expert_gate=True)


def test_olmoe_preset_has_full_qk_norm():
    cfg = get_preset("olmoe_1b_7b")
    assert cfg.qk_norm == "full"
    # q_norm [H*C] + k_norm [G*C] on every layer: 2 * 2048 a layer (MHA).
    no_norm = count_params(dataclasses.replace(cfg, qk_norm="none"))
    assert count_params(cfg).total - no_norm.total == 16 * 2 * 2048
