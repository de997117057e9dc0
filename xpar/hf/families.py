"""The Hugging Face model families xpar maps exactly, and their configs against ModelConfig.

Import reads Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE configs; export picks the family that
computes what an xpar model computes (`choose_family`). Every HF field that changes the math
is either mapped or refused with an error naming it; training-only fields (aux loss weight,
router jitter) are carried where the family has them.
"""

from __future__ import annotations

from typing import Any

from xpar.checks import UserError
from xpar.hf.names import MIXTRAL, QWEN, Layout
from xpar.model import ModelConfig
from xpar.moe import MoEConfig

LAYOUTS: dict[str, Layout] = {
    "llama": QWEN,  # dense: only the common and dense-FFN names are used
    "mixtral": MIXTRAL,
    "qwen2_moe": QWEN,
    "qwen3_moe": QWEN,
    "olmoe": QWEN,
}
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}


def moe_config_classes() -> dict[str, type]:
    """model_type -> transformers config class of the MoE families `import` reads
    (DeepSeek-V3's is mapped by xpar.hf.deepseek)."""
    import transformers

    classes = {
        "mixtral": transformers.MixtralConfig,
        "qwen2_moe": transformers.Qwen2MoeConfig,
        "qwen3_moe": transformers.Qwen3MoeConfig,
        "olmoe": transformers.OlmoeConfig,
        "deepseek_v3": transformers.DeepseekV3Config,
    }
    return classes


EXPORT_TARGET = "Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE or Llama"


def refuse(where: str, field: str, value: object, why: str, target: str = "xpar") -> UserError:
    """The one-line error for a field that does not map: `where: field=value does not map to
    target: why`."""
    return UserError(f"{where}: {field}={value!r} does not map to {target}: {why}")


def refuse_export(field: str, value: object, why: str) -> UserError:
    """The one-line error for an xpar field that no family `export` writes expresses."""
    return refuse("export", field, value, why, EXPORT_TARGET)


# ---- HF config -> ModelConfig ---------------------------------------------------------------


def common_from_hf(hf: Any, where: str) -> dict[str, Any]:
    """ModelConfig fields every Llama-family config sets the same way."""
    if hf.hidden_act != "silu":
        raise refuse(where, "hidden_act", hf.hidden_act, "xpar FFNs are SwiGLU (silu)")
    rope = dict(hf.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        raise refuse(
            where, "rope_scaling", rope, "xpar models plain RoPE (rope_type 'default') only"
        )
    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    return dict(
        vocab_size=hf.vocab_size,
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=heads,
        n_kv_heads=hf.num_key_value_heads or heads,
        max_seq_len=hf.max_position_embeddings,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        norm_eps=hf.rms_norm_eps,
        tie_embeddings=bool(hf.tie_word_embeddings),
        init_std=hf.initializer_range,
        attn_head_dim=None if heads * head_dim == hf.hidden_size else head_dim,
    )


def check_no_sliding_window(where: str, window: int | None, max_positions: int) -> None:
    """A window that covers every position is full attention; any smaller one is refused."""
    if window and window < max_positions:
        raise refuse(
            where,
            "sliding_window",
            window,
            f"xpar attends over the whole sequence; only no window or one >= "
            f"max_position_embeddings={max_positions} maps",
        )


def moe_placement(hf: Any, where: str) -> tuple[int, int]:
    """(first_k_dense, moe_every) reproducing Qwen's decoder_sparse_step / mlp_only_layers."""
    n, step, dense = hf.num_hidden_layers, hf.decoder_sparse_step, set(hf.mlp_only_layers or [])
    moe_ids = [i for i in range(n) if i not in dense and (i + 1) % step == 0]
    # The first MoE layer is first_k_dense + every - 1, so each `every` fixes first_k_dense.
    for every in range(1, n + 1):
        first_k_dense = (moe_ids[0] if moe_ids else n) - every + 1
        ids = [
            i for i in range(max(first_k_dense, 0), n) if (i - first_k_dense) % every == every - 1
        ]
        if moe_ids and first_k_dense >= 0 and ids == moe_ids:
            return first_k_dense, every
    raise refuse(
        where,
        "mlp_only_layers",
        sorted(dense),
        f"with decoder_sparse_step={step} the MoE layers are {moe_ids}, which "
        f"model.first_k_dense and model.moe_every cannot express",
    )


def model_config_from_hf(hf: Any, where: str) -> ModelConfig:
    """The ModelConfig computing what the HF MoE config `hf` computes (see module doc)."""
    kind = hf.model_type
    model = common_from_hf(hf, where)
    moe: dict[str, Any] = dict(
        d_model=hf.hidden_size,
        num_experts=hf.num_experts,
        top_k=hf.num_experts_per_tok,
        score_func="softmax",
        norm_topk_prob=bool(getattr(hf, "norm_topk_prob", True)),  # Mixtral: always
        aux_loss_coef=hf.router_aux_loss_coef,
        z_loss_coef=0.0,  # none of these families trains with a router z-loss
    )
    if kind == "mixtral":
        check_no_sliding_window(where, hf.sliding_window, hf.max_position_embeddings)
        model["d_ff"] = moe["d_ff"] = hf.intermediate_size
        moe["jitter_eps"] = hf.router_jitter_noise
    elif kind in ("qwen2_moe", "qwen3_moe"):
        if hf.use_sliding_window:
            check_no_sliding_window(where, hf.sliding_window, hf.max_position_embeddings)
        model["d_ff"], moe["d_ff"] = hf.intermediate_size, hf.moe_intermediate_size
        model["first_k_dense"], model["moe_every"] = moe_placement(hf, where)
        if kind == "qwen2_moe":
            model["attn_bias"] = bool(hf.qkv_bias)
            moe |= dict(
                num_shared_experts=1,
                shared_d_ff=hf.shared_expert_intermediate_size,
                shared_expert_gate=True,
            )
        else:
            _no_attention_bias(hf, where)
            model["qk_norm"] = "head"
    elif kind == "olmoe":
        _no_attention_bias(hf, where)
        if hf.clip_qkv is not None:
            raise refuse(where, "clip_qkv", hf.clip_qkv, "xpar does not clamp q, k, v")
        if model["attn_head_dim"] is not None:
            raise refuse(where, "head_dim", hf.head_dim, "OLMoE's k_norm assumes hidden/heads")
        model["d_ff"] = moe["d_ff"] = hf.intermediate_size
        model["qk_norm"] = "full"
    else:
        raise AssertionError(kind)
    try:
        return ModelConfig(**model, moe=MoEConfig(**moe))
    except ValueError as e:
        raise UserError(f"{where}: {e}") from e


def _no_attention_bias(hf: Any, where: str) -> None:
    if hf.attention_bias:
        raise refuse(where, "attention_bias", True, "xpar has no bias on the output projection")


# ---- ModelConfig -> HF family ----------------------------------------------------------------


def choose_family(cfg: ModelConfig) -> str:
    """The HF family (model_type) that computes exactly what `cfg` computes; a UserError
    naming the first field that maps to none of them otherwise.

    qk_norm none: Mixtral when it fits (normalised top-k, every layer MoE, no shared expert,
    no q/k/v bias), else Qwen2-MoE (its gated shared expert can stand for none, or for an
    ungated one: see export). qk_norm head: Qwen3-MoE. qk_norm full: OLMoE. Dense: Llama.
    """
    moe = cfg.moe
    if cfg.mla is not None:
        raise refuse_export("model.mla", "set", "multi-head latent attention is DeepSeek's")
    if moe is None:
        if cfg.qk_norm != "none" or cfg.attn_bias:
            field = "model.qk_norm" if cfg.qk_norm != "none" else "model.attn_bias"
            value = cfg.qk_norm if cfg.qk_norm != "none" else True
            raise refuse_export(field, value, "a dense model exports as Llama, which has neither")
        return "llama"
    if moe.router != "topk":
        raise refuse_export(
            "moe.router", moe.router, "they pick the top-k of all experts (DeepSeek-V3 groups)"
        )
    if moe.score_func != "softmax":
        raise refuse_export("moe.score_func", moe.score_func, "these families route by softmax")
    if moe.route_scale != 1.0:
        raise refuse_export("moe.route_scale", moe.route_scale, "these families do not scale")
    every_layer = len(cfg.moe_layer_ids()) == cfg.n_layers
    if cfg.qk_norm == "full":
        olmoe = "model.qk_norm='full' is OLMoE's, which has"
        if not every_layer:
            raise refuse_export(
                "model.first_k_dense/moe_every",
                (cfg.first_k_dense, cfg.moe_every),
                f"{olmoe} an MoE FFN in every layer",
            )
        if moe.num_shared_experts:
            raise refuse_export(
                "moe.num_shared_experts", moe.num_shared_experts, f"{olmoe} no shared expert"
            )
        if cfg.attn_bias:
            raise refuse_export("model.attn_bias", True, f"{olmoe} no q/k/v-only biases")
        if cfg.attn_head_dim is not None and cfg.head_dim * cfg.n_heads != cfg.d_model:
            raise refuse_export(
                "model.attn_head_dim", cfg.attn_head_dim, f"{olmoe} head dim d_model / n_heads"
            )
        return "olmoe"
    if cfg.qk_norm == "head":
        qwen3 = "model.qk_norm='head' is Qwen3-MoE's, which has"
        if moe.num_shared_experts:
            raise refuse_export(
                "moe.num_shared_experts", moe.num_shared_experts, f"{qwen3} no shared expert"
            )
        if cfg.attn_bias:
            raise refuse_export("model.attn_bias", True, f"{qwen3} no q/k/v-only biases")
        return "qwen3_moe"
    if moe.norm_topk_prob and every_layer and not moe.num_shared_experts and not cfg.attn_bias:
        return "mixtral"
    return "qwen2_moe"


def hf_config_from_model(family: str, cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    """config.json of `family` for `cfg` (as adjusted for the family by export)."""
    import transformers

    moe = cfg.moe
    kw: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        hidden_act="silu",
        bos_token_id=None,  # the tokenizer's ids replace these when there is one
        eos_token_id=None,
        pad_token_id=None,
    )
    if cfg.attn_head_dim is not None:
        kw["head_dim"] = cfg.head_dim
    if moe is not None:
        kw |= dict(num_experts_per_tok=moe.top_k, router_aux_loss_coef=moe.aux_loss_coef)
    dense_ids = [i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)]
    if family == "llama":
        cls = transformers.LlamaConfig
        kw |= dict(intermediate_size=cfg.d_ff, attention_bias=False, mlp_bias=False)
    elif family == "mixtral":
        cls = transformers.MixtralConfig
        kw |= dict(intermediate_size=moe.d_ff, num_local_experts=moe.num_experts)
        kw |= dict(sliding_window=None, router_jitter_noise=moe.jitter_eps)
    elif family in ("qwen2_moe", "qwen3_moe"):
        kw |= dict(intermediate_size=cfg.d_ff, moe_intermediate_size=moe.d_ff)
        kw |= dict(num_experts=moe.num_experts, norm_topk_prob=moe.norm_topk_prob)
        kw |= dict(decoder_sparse_step=1, mlp_only_layers=dense_ids, use_sliding_window=False)
        if family == "qwen2_moe":
            cls = transformers.Qwen2MoeConfig
            kw |= dict(shared_expert_intermediate_size=moe.shared_hidden, qkv_bias=cfg.attn_bias)
        else:
            cls = transformers.Qwen3MoeConfig
            kw["attention_bias"] = False
    elif family == "olmoe":
        cls = transformers.OlmoeConfig
        kw |= dict(intermediate_size=moe.d_ff, num_experts=moe.num_experts)
        kw |= dict(norm_topk_prob=moe.norm_topk_prob, attention_bias=False, clip_qkv=None)
    else:
        raise AssertionError(family)
    config = cls(**kw).to_dict()
    config["architectures"] = [ARCHITECTURES[family]]
    config["dtype"] = dtype
    return config
