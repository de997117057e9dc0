"""xpar models in DeepSeek-V3 layout ↔ transformers' DeepseekV3ForCausalLM.

The layout: multi-head latent attention (`model.mla`), the first `first_k_dense` layers dense
and every later one MoE, sigmoid expert scores with a balancing bias, group-limited routing
(groups scored by the sum of their best two biased expert scores), optional top-k
renormalisation, weights scaled by `route_scale`, and shared experts. A config outside it gets
one line from `deepseek_v3_mismatch` naming the field that does not map.

HF is dropless: a model trained with `moe.capacity_factor` (or `group_capacity_factor`)
exports to the same weights, and HF computes what xpar computes with capacity_factor=None.
Other training-only settings (losses, balancing rate, jitter, expert kernels) do not export.

Legend: E experts, F expert hidden dim, D model dim.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import Tensor

from xpar.model.config import ModelConfig
from xpar.model.mla import MLAConfig
from xpar.moe import MoEConfig

# ModelConfig fields that become config.json entries (or must keep their defaults; the config
# itself rejects the GQA options with MLA). A field missing here blocks export when it is not
# at its default, so a new architecture option never exports silently wrong.
_MODEL_FIELDS_MAPPED = {
    "vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "n_kv_heads", "max_seq_len",
    "rope_theta", "norm_eps", "tie_embeddings", "moe", "moe_every", "first_k_dense", "init_std",
    "attn_head_dim", "qk_norm", "attn_bias", "mla",
}  # fmt: skip
_MOE_FIELDS_MAPPED = {
    "d_model", "d_ff", "num_experts", "top_k", "router", "score_func", "norm_topk_prob",
    "route_scale", "num_groups", "top_groups", "group_score", "group_topk_experts",
    "num_shared_experts", "shared_d_ff",
}  # fmt: skip
# Settings of training only: the HF model computes the same function whatever they are.
_MOE_FIELDS_TRAINING = {
    "jitter_eps", "capacity_factor", "group_capacity_factor", "min_capacity", "drop_policy",
    "pad_to_capacity", "aux_loss_coef", "z_loss_coef", "bias_update_rate", "experts_impl",
    "init_std",
}  # fmt: skip

# xpar name ↔ HF name inside one layer (the HF names follow `model.layers.i.`).
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
    "ffn.router.gate.weight": "mlp.gate.weight",
    "ffn.router.expert_bias": "mlp.gate.e_score_correction_bias",
    "ffn.shared_expert.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_expert.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared_expert.w2.weight": "mlp.shared_experts.down_proj.weight",
}
_GLOBAL_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# Per-expert HF names (DeepSeek's on-disk layout, which transformers fuses on load).
_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_LAYER_FROM_HF = {hf: x for x, hf in _LAYER_NAMES.items()}
_GLOBAL_FROM_HF = {hf: x for x, hf in _GLOBAL_NAMES.items()}
_EXPERT_FROM_HF = {hf: x for x, hf in _EXPERT_NAMES.items()}


def _off_default(cfg: object, allowed: set[str]) -> list[str]:
    """Fields of dataclass `cfg` outside `allowed` whose value is not the field's default."""
    off = []
    for f in dataclasses.fields(cfg):
        if f.name in allowed or f.default is dataclasses.MISSING:
            continue
        if getattr(cfg, f.name) != f.default:
            off.append(f"{f.name}={getattr(cfg, f.name)!r}")
    return off


def deepseek_v3_mismatch(model: ModelConfig) -> str | None:
    """None when `model` maps exactly onto DeepseekV3ForCausalLM, else one line naming the
    field and value that do not map."""
    off = _off_default(model, _MODEL_FIELDS_MAPPED)
    if off:
        return f"model.{off[0]} has no DeepseekV3 counterpart"
    if model.mla is None:
        return "model.mla=None: DeepseekV3 uses multi-head latent attention, this model GQA"
    moe = model.moe
    if moe is None:
        return "model.moe=None: a dense model is not a DeepseekV3 MoE model"
    if model.moe_every != 1:
        return (
            f"model.moe_every={model.moe_every}: DeepseekV3 makes every layer after "
            f"first_k_dense an MoE layer (moe_every=1)"
        )
    off = _off_default(moe, _MOE_FIELDS_MAPPED | _MOE_FIELDS_TRAINING)
    if off:
        return f"moe.{off[0]} has no DeepseekV3 counterpart"
    return _routing_mismatch(moe) or _shared_mismatch(moe)


def _routing_mismatch(moe: MoEConfig) -> str | None:
    if moe.score_func != "sigmoid":
        return f"moe.score_func={moe.score_func!r}: DeepseekV3 scores experts with 'sigmoid'"
    if moe.router == "two_level" and moe.group_score != "topk_sum":
        return (
            f"moe.group_score={moe.group_score!r}: DeepseekV3 scores groups by their best "
            f"experts ('topk_sum'), with no group gate"
        )
    if moe.router == "two_level" and moe.group_topk_experts != 2:
        return (
            f"moe.group_topk_experts={moe.group_topk_experts}: DeepseekV3 scores a group "
            f"by its best 2 experts"
        )
    if moe.router == "topk" and moe.num_experts < 2:  # HF scores its one group by its top 2
        return f"moe.num_experts={moe.num_experts}: DeepseekV3 needs at least 2 experts"
    return None


def _shared_mismatch(moe: MoEConfig) -> str | None:
    if moe.num_shared_experts == 0:
        return "moe.num_shared_experts=0: DeepseekV3 always has shared experts"
    if moe.shared_hidden % moe.d_ff:
        return (
            f"moe.shared_d_ff={moe.shared_d_ff} is not a multiple of moe.d_ff={moe.d_ff}: "
            f"DeepseekV3's shared experts have n_shared_experts * moe_intermediate_size units"
        )
    return None


def deepseek_v3_config(model: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json of `model` as a DeepseekV3ForCausalLM (it must map: see
    `deepseek_v3_mismatch`)."""
    from transformers import DeepseekV3Config

    mismatch = deepseek_v3_mismatch(model)
    if mismatch is not None:
        raise ValueError(f"cannot export as DeepseekV3ForCausalLM: {mismatch}")
    moe, mla = model.moe, model.mla
    assert moe is not None and mla is not None
    two_level = moe.router == "two_level"
    config = DeepseekV3Config(
        architectures=["DeepseekV3ForCausalLM"],
        vocab_size=model.vocab_size,
        hidden_size=model.d_model,
        intermediate_size=model.d_ff,
        moe_intermediate_size=moe.d_ff,
        num_hidden_layers=model.n_layers,
        num_attention_heads=model.n_heads,
        num_key_value_heads=model.n_heads,
        n_shared_experts=moe.shared_hidden // moe.d_ff,
        n_routed_experts=moe.num_experts,
        routed_scaling_factor=moe.route_scale,
        kv_lora_rank=mla.kv_lora_rank,
        q_lora_rank=mla.q_lora_rank,
        qk_rope_head_dim=mla.qk_rope_head_dim,
        v_head_dim=mla.v_head_dim,
        qk_nope_head_dim=mla.qk_nope_head_dim,
        n_group=moe.num_groups if two_level else 1,
        topk_group=moe.top_groups if two_level else 1,
        num_experts_per_tok=moe.top_k,
        first_k_dense_replace=model.first_k_dense,
        norm_topk_prob=moe.norm_topk_prob,
        hidden_act="silu",
        max_position_embeddings=model.max_seq_len,
        initializer_range=model.init_std,
        rms_norm_eps=model.norm_eps,
        tie_word_embeddings=model.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": model.rope_theta},
        rope_interleave=mla.rope_interleave,
        attention_bias=False,
        num_nextn_predict_layers=0,  # xpar trains no multi-token-prediction module
        dtype=str(dtype).removeprefix("torch."),
    )
    return config.to_dict()


def to_deepseek_v3(model: ModelConfig, state: dict[str, Tensor]) -> tuple[dict, dict[str, Tensor]]:
    """(config.json dict, state dict) of DeepseekV3ForCausalLM for the xpar model `model` with
    the full (all experts) state dict `state`; experts are written per expert, as in
    DeepSeek's checkpoints. Raises ValueError naming what does not map."""
    config = deepseek_v3_config(model, state["embed.weight"].dtype)
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        out.update(_export_tensor(name, tensor))
    return config, out


def _export_tensor(name: str, tensor: Tensor) -> dict[str, Tensor]:
    if name in _GLOBAL_NAMES:
        return {_GLOBAL_NAMES[name]: tensor}
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m is None:
        raise ValueError(f"state dict entry {name!r} has no DeepseekV3 counterpart")
    prefix, rest = f"model.layers.{m[1]}.", m[2]
    if rest in _LAYER_NAMES:
        return {prefix + _LAYER_NAMES[rest]: tensor}
    e = re.fullmatch(r"ffn\.experts\.(w[123])", rest)
    if e is None:
        raise ValueError(f"state dict entry {name!r} has no DeepseekV3 counterpart")
    hf = _EXPERT_NAMES[e[1]]
    # Clones: safetensors refuses to save tensors that share storage.
    return {f"{prefix}mlp.experts.{i}.{hf}.weight": w.clone() for i, w in enumerate(tensor)}


def from_deepseek_v3(
    config: dict, state: dict[str, Tensor]
) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The xpar config and state dict of a DeepseekV3ForCausalLM (config.json dict, and its
    state dict with experts fused, as in memory, or per expert, as on disk). Training-only
    MoE settings take MoEConfig's defaults; multi-token-prediction layers are left out.
    Raises ValueError for what xpar cannot compute (YaRN rope, attention biases, ...)."""
    model = _model_from_hf(config)
    out: dict[str, Tensor] = {}
    experts: dict[tuple[str, str], dict[int, Tensor]] = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and model.tie_embeddings:
            continue
        if name in _GLOBAL_FROM_HF:
            out[_GLOBAL_FROM_HF[name]] = tensor
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if m is None:
            raise ValueError(f"DeepseekV3 state dict entry {name!r} has no xpar counterpart")
        if int(m[1]) >= model.n_layers:  # multi-token-prediction layers follow the last one
            continue
        layer, rest = f"layers.{m[1]}.", m[2]
        if rest in _LAYER_FROM_HF:
            out[layer + _LAYER_FROM_HF[rest]] = tensor
        elif rest == "mlp.experts.gate_up_proj":  # fused [E, 2F, D]: gate rows, then up rows
            out[layer + "ffn.experts.w1"], out[layer + "ffn.experts.w3"] = tensor.chunk(2, 1)
        elif rest == "mlp.experts.down_proj":
            out[layer + "ffn.experts.w2"] = tensor
        elif e := re.fullmatch(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", rest):
            experts.setdefault((layer, _EXPERT_FROM_HF[e[2]]), {})[int(e[1])] = tensor
        else:
            raise ValueError(f"DeepseekV3 state dict entry {name!r} has no xpar counterpart")
    for (layer, w), by_expert in experts.items():
        out[f"{layer}ffn.experts.{w}"] = torch.stack([by_expert[i] for i in sorted(by_expert)])
    return model, out


def _model_from_hf(c: dict) -> ModelConfig:
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    refused = {
        "rope type": (rope_type, "default"),
        "attention_bias": (c.get("attention_bias", False), False),
        "hidden_act": (c.get("hidden_act", "silu"), "silu"),
        "scoring_func": (c.get("scoring_func", "sigmoid"), "sigmoid"),
        "topk_method": (c.get("topk_method", "noaux_tc"), "noaux_tc"),
        "num_key_value_heads": (
            c.get("num_key_value_heads") or c["num_attention_heads"],
            c["num_attention_heads"],
        ),
    }
    for name, (value, supported) in refused.items():
        if value != supported:
            raise ValueError(
                f"DeepseekV3 {name}={value!r} is not supported; xpar needs {supported!r}"
            )
    moe = MoEConfig(
        d_model=c["hidden_size"],
        d_ff=c["moe_intermediate_size"],
        num_experts=c["n_routed_experts"],
        top_k=c["num_experts_per_tok"],
        router="two_level",
        score_func="sigmoid",
        norm_topk_prob=c["norm_topk_prob"],
        route_scale=c["routed_scaling_factor"],
        num_groups=c["n_group"],
        top_groups=c["topk_group"],
        group_score="topk_sum",
        group_topk_experts=2,
        num_shared_experts=c["n_shared_experts"],
    )
    mla = MLAConfig(
        q_lora_rank=c["q_lora_rank"],
        kv_lora_rank=c["kv_lora_rank"],
        qk_nope_head_dim=c["qk_nope_head_dim"],
        qk_rope_head_dim=c["qk_rope_head_dim"],
        v_head_dim=c["v_head_dim"],
        rope_interleave=c.get("rope_interleave", True),
    )
    return ModelConfig(
        vocab_size=c["vocab_size"],
        d_model=c["hidden_size"],
        n_layers=c["num_hidden_layers"],
        n_heads=c["num_attention_heads"],
        d_ff=c["intermediate_size"],
        max_seq_len=c["max_position_embeddings"],
        rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)),
        norm_eps=c["rms_norm_eps"],
        tie_embeddings=c.get("tie_word_embeddings", False),
        moe=moe,
        first_k_dense=c["first_k_dense_replace"],
        init_std=c.get("initializer_range", 0.02),
        mla=mla,
    )
