"""DeepSeek-V3 layout ↔ transformers' DeepseekV3ForCausalLM: an exported trained xpar model
loads and gives xpar's logits; a random HF model imported into xpar gives HF's logits (MLA and
routing math equal independently of the export); configs that do not map name their field."""

import dataclasses

import pytest
import torch

from xpar.hf.__main__ import main as hf_main
from xpar.hf.deepseek import deepseek_v3_mismatch, from_deepseek_v3, to_deepseek_v3
from xpar.model import ModelConfig, MoETransformerLM
from xpar.model.mla import MLAConfig
from xpar.moe import MoEConfig
from xpar.persist import read_model, write_model_dir

transformers = pytest.importorskip("transformers")


def deepseek_layout(**changes) -> ModelConfig:
    """3 layers (1 dense), MLA with a low-rank query, 8 experts in 4 groups, top-2 groups."""
    moe = MoEConfig(
        d_model=32,
        d_ff=16,
        num_experts=8,
        top_k=2,
        router="two_level",
        score_func="sigmoid",
        norm_topk_prob=True,
        route_scale=2.5,
        num_groups=4,
        top_groups=2,
        group_score="topk_sum",
        group_topk_experts=2,
        num_shared_experts=1,
        bias_update_rate=0.05,
        aux_loss_coef=1e-3,
        z_loss_coef=0.0,
    )
    mla = MLAConfig(
        q_lora_rank=12, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6
    )
    cfg = ModelConfig(
        vocab_size=64,
        d_model=32,
        n_layers=3,
        n_heads=4,
        d_ff=48,
        max_seq_len=32,
        rope_theta=500.0,
        norm_eps=1e-6,
        moe=moe,
        first_k_dense=1,
        mla=mla,
    )
    return dataclasses.replace(cfg, **changes)


def train_a_few_steps(model: MoETransformerLM, steps: int = 4) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        tokens_BS = torch.randint(0, model.cfg.vocab_size, (4, 17))
        out = model(tokens_BS[:, :-1], tokens_BS[:, 1:])
        out.total_loss.backward()
        opt.step()
        opt.zero_grad()
        model.update_expert_bias()


def hf_logits(model, tokens_BS: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens_BS).logits


@pytest.mark.parametrize(
    ("tied", "router"), [(False, "two_level"), (True, "topk")], ids=["two_level", "topk_tied"]
)
def test_trained_export_loads_with_same_logits(tmp_path, tied, router):
    """A top-k sigmoid router exports as one group (n_group=1, topk_group=1)."""
    torch.manual_seed(0)
    moe = dataclasses.replace(deepseek_layout().moe, router=router)
    model = MoETransformerLM(deepseek_layout(tie_embeddings=tied, moe=moe))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    train_a_few_steps(model)
    state = model.state_dict()
    assert not torch.equal(
        state["layers.1.attn.wkv_b.weight"], initial["layers.1.attn.wkv_b.weight"]
    )
    assert state["layers.1.ffn.router.expert_bias"].abs().sum() > 0

    config, hf_state = to_deepseek_v3(model.cfg, state)
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in hf_state  # DeepSeek's disk layout
    groups = (4, 2) if router == "two_level" else (1, 1)
    assert (config["n_group"], config["topk_group"], config["routed_scaling_factor"]) == (
        *groups,
        2.5,
    )
    # Through the command: a model dir in, an HF checkpoint out, and back.
    write_model_dir(tmp_path / "xpar", state, model.cfg)
    assert hf_main(["export", str(tmp_path / "xpar"), str(tmp_path / "hf")]) == 0
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, output_loading_info=True
    )
    assert hf_main(["import", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back = read_model(tmp_path / "back")
    assert back.model.mla == model.cfg.mla and back.model.moe.route_scale == 2.5
    for name, tensor in state.items():
        assert torch.equal(back.state[name], tensor), name
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    hf.eval()
    model.eval()
    tokens_BS = torch.randint(0, 64, (3, 20))
    with torch.no_grad():
        expected_BSV = model(tokens_BS).logits
    torch.testing.assert_close(hf_logits(hf, tokens_BS), expected_BSV, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("q_lora_rank", "interleave"), [(None, True), (8, False)], ids=["full_q", "low_rank_q"]
)
def test_random_hf_model_imports_with_same_logits(q_lora_rank, interleave):
    torch.manual_seed(1)
    config = transformers.DeepseekV3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=40,
        moe_intermediate_size=12,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=2,
        n_routed_experts=8,
        routed_scaling_factor=1.5,
        kv_lora_rank=16,
        q_lora_rank=q_lora_rank,
        qk_rope_head_dim=4,
        v_head_dim=10,
        qk_nope_head_dim=6,
        n_group=2,
        topk_group=1,
        num_experts_per_tok=3,
        first_k_dense_replace=1,
        norm_topk_prob=False,
        max_position_embeddings=32,
        initializer_range=0.2,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
        rope_interleave=interleave,
        num_nextn_predict_layers=0,
    )
    hf = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():  # HF initialises the balancing bias to zero and norms to one
        for name, p in hf.named_parameters():
            if name.endswith("layernorm.weight"):
                p.add_(0.1 * torch.randn_like(p))
        for layer in hf.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(std=0.1)
    cfg, state = from_deepseek_v3(config.to_dict(), hf.state_dict())
    model = MoETransformerLM(cfg).eval()
    model.load_state_dict(state)
    tokens_BS = torch.randint(0, 64, (2, 24))
    with torch.no_grad():
        logits_BSV = model(tokens_BS).logits
    torch.testing.assert_close(logits_BSV, hf_logits(hf, tokens_BS), atol=1e-5, rtol=0)
    # and back: the export reproduces HF's weights (experts per expert)
    _, exported = to_deepseek_v3(cfg, state)
    fused = hf.model.layers[2].mlp.experts.gate_up_proj
    torch.testing.assert_close(
        exported["model.layers.2.mlp.experts.5.up_proj.weight"], fused[5, 12:]
    )


def moe_changed(**changes) -> ModelConfig:
    return deepseek_layout(moe=dataclasses.replace(deepseek_layout().moe, **changes))


@pytest.mark.parametrize(
    ("cfg", "line"),
    [
        (deepseek_layout(mla=None, n_kv_heads=2), "model.mla=None: DeepseekV3 uses multi-head"),
        (moe_changed(score_func="softmax"), "moe.score_func='softmax': DeepseekV3 scores"),
        (moe_changed(group_topk_experts=1), "moe.group_topk_experts=1: DeepseekV3 scores a group"),
        (moe_changed(group_score="learned"), "moe.group_score='learned': DeepseekV3 scores"),
        (moe_changed(num_shared_experts=0), "moe.num_shared_experts=0: DeepseekV3 always"),
        (moe_changed(shared_d_ff=24), "moe.shared_d_ff=24 is not a multiple of moe.d_ff=16"),
        (deepseek_layout(moe_every=2, first_k_dense=0), "model.moe_every=2: DeepseekV3 makes"),
        (deepseek_layout(moe=None), "model.moe=None: a dense model"),
    ],
    ids=[
        "gqa",
        "softmax",
        "group_top1",
        "group_gate",
        "no_shared",
        "shared_d_ff",
        "every2",
        "dense",
    ],
)
def test_mismatch_names_the_field(cfg, line):
    assert deepseek_v3_mismatch(cfg).startswith(line)
    with pytest.raises(ValueError, match="cannot export as DeepseekV3ForCausalLM: "):
        to_deepseek_v3(cfg, {"embed.weight": torch.zeros(1)})


def test_capacity_factor_exports_as_dropless():
    assert deepseek_v3_mismatch(moe_changed(capacity_factor=1.25)) is None
