"""ModelConfig: the schema of an MoE transformer LM, checked on construction, and presets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from xpar.checks import at_least, one_of
from xpar.model.mla import MLAConfig
from xpar.moe import MoEConfig

QK_NORMS = ("none", "head", "full")


def _at_least(field: str, value: float, low: float, *, strict: bool = False) -> None:
    at_least(f"model.{field}", value, low, strict=strict)


@dataclass
class ModelConfig:
    """A decoder-only LM: pre-norm blocks of causal GQA attention with rotary positions and a
    SwiGLU FFN that is either dense (hidden `d_ff`) or an MoE layer (`moe`).

    MoE placement: layer i (0-based) is an MoE layer iff `moe` is set, `i >= first_k_dense`
    and `(i - first_k_dense) % moe_every == moe_every - 1`; every other layer is dense. So
    `moe_every=1` makes every layer after the first `first_k_dense` MoE (Mixtral, DeepSeek),
    and `moe_every=2` the last of each pair (layers 1, 3, 5, ... as in GShard/Switch).

    QK norm (before rotary, eps `norm_eps`): `qk_norm="head"` normalises each head's q and k
    over its C dims with one weight [C] shared by all heads (Qwen3-MoE); `"full"` normalises
    the whole q projection [H*C] and the whole k projection [G*C] (OLMoE).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int  # hidden size of the dense SwiGLU FFN layers
    n_kv_heads: int | None = None  # GQA; None means n_heads (plain multi-head attention)
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    moe: MoEConfig | None = None
    moe_every: int = 1
    first_k_dense: int = 0
    init_std: float = 0.02
    # Attention variants of HF MoE families; the defaults are Llama/Mixtral attention.
    attn_head_dim: int | None = None  # per-head dim; None: d_model // n_heads (Qwen3-MoE: 128)
    qk_norm: str = "none"  # RMSNorm on q and k before rotary: none | head | full (see Attention)
    attn_bias: bool = False  # biases on the q, k, v projections (Qwen2-MoE); never on o
    # Multi-head latent attention (DeepSeek-V2/V3) in place of GQA; see xpar.model.mla.
    mla: MLAConfig | None = None

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
            _at_least(field, getattr(self, field), 1)
        _at_least("max_seq_len", self.max_seq_len, 1)
        _at_least("moe_every", self.moe_every, 1)
        _at_least("first_k_dense", self.first_k_dense, 0)
        _at_least("rope_theta", self.rope_theta, 0.0, strict=True)
        _at_least("norm_eps", self.norm_eps, 0.0, strict=True)
        _at_least("init_std", self.init_std, 0.0, strict=True)
        one_of("model.qk_norm", self.qk_norm, QK_NORMS)
        if isinstance(self.mla, dict):  # a config section (dataclasses.asdict, JSON)
            self.mla = MLAConfig(**self.mla)
        if self.mla is not None:
            self._check_mla()
        elif self.attn_head_dim is not None:
            _at_least("attn_head_dim", self.attn_head_dim, 1)
            if self.attn_head_dim % 2:
                raise ValueError(
                    f"model.attn_head_dim={self.attn_head_dim} must be even for rotary embeddings"
                )
        elif self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}"
                f" (or set model.attn_head_dim)"
            )
        elif self.head_dim % 2:
            raise ValueError(
                f"model.d_model={self.d_model} / model.n_heads={self.n_heads} = head dim "
                f"{self.head_dim} must be even for rotary embeddings"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} is not divisible by "
                f"model.n_kv_heads={self.n_kv_heads}"
            )
        if self.first_k_dense > self.n_layers:
            raise ValueError(
                f"model.first_k_dense={self.first_k_dense} must be in [0, n_layers={self.n_layers}]"
            )
        if self.moe is not None:
            self._check_moe(self.moe)

    def _check_mla(self) -> None:
        """MLA has its own head dims and one latent for keys and values: the GQA options
        must stay at their defaults."""
        gqa_options = {
            "n_kv_heads": (self.n_kv_heads, self.n_heads, "unset"),
            "attn_head_dim": (self.attn_head_dim, None, "unset"),
            "qk_norm": (self.qk_norm, "none", "'none'"),
            "attn_bias": (self.attn_bias, False, "False"),
        }
        for name, (value, default, hint) in gqa_options.items():
            if value != default:
                raise ValueError(
                    f"model.{name}={value!r} does not apply to multi-head latent attention "
                    f"(model.mla is set); leave it {hint}"
                )

    @property
    def rope_dim(self) -> int:
        """Dims each rotary table covers: the head dim, or MLA's rotary part."""
        return self.head_dim if self.mla is None else self.mla.qk_rope_head_dim

    def _check_moe(self, moe: MoEConfig) -> None:
        if moe.d_model != self.d_model:
            raise ValueError(
                f"model.moe.d_model={moe.d_model} does not match model.d_model={self.d_model}"
            )
        if not self.moe_layer_ids():
            raise ValueError(
                f"model.first_k_dense={self.first_k_dense} and model.moe_every="
                f"{self.moe_every} leave no MoE layer among model.n_layers={self.n_layers}; "
                f"set model.moe=None for a dense model"
            )

    @property
    def head_dim(self) -> int:
        """Per-head q/k/v dim C: `attn_head_dim`, or d_model // n_heads when that is None."""
        return self.attn_head_dim or self.d_model // self.n_heads

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer i holds an MoE FFN (see the class docstring for the rule)."""
        if self.moe is None or i < self.first_k_dense:
            return False
        return (i - self.first_k_dense) % self.moe_every == self.moe_every - 1

    def moe_layer_ids(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]


def tiny() -> ModelConfig:
    """A few-hundred-thousand-parameter model for CPU tests and debug runs."""
    moe = MoEConfig(d_model=64, d_ff=64, num_experts=8, top_k=2)
    return ModelConfig(
        vocab_size=256,
        d_model=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        d_ff=128,
        max_seq_len=128,
        moe=moe,
    )


def moe_300m() -> ModelConfig:
    """A ~330M-total-parameter (~100M active) MoE LM for single-GPU runs and benchmarks:
    12 layers, 8 experts, top-2, a 32k vocabulary."""
    moe = MoEConfig(d_model=768, d_ff=1152, num_experts=8, top_k=2)
    return ModelConfig(
        vocab_size=32768,
        d_model=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=4,
        d_ff=3072,
        max_seq_len=2048,
        tie_embeddings=False,
        moe=moe,
    )


def mixtral_8x7b() -> ModelConfig:
    """Mixtral-8x7B (46.7B total, 12.9B active). Sliding-window attention is not modelled."""
    moe = MoEConfig(
        d_model=4096,
        d_ff=14336,
        num_experts=8,
        top_k=2,
        score_func="softmax",
        norm_topk_prob=True,
        aux_loss_coef=0.02,
        z_loss_coef=0.0,
    )
    return ModelConfig(
        vocab_size=32000,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        d_ff=14336,
        max_seq_len=32768,
        rope_theta=1e6,
        norm_eps=1e-5,
        tie_embeddings=False,
        moe=moe,
    )


def olmoe_1b_7b() -> ModelConfig:
    """OLMoE-1B-7B (6.9B total, 1.3B active): full-width QK norm, no shared experts."""
    moe = MoEConfig(
        d_model=2048,
        d_ff=1024,
        num_experts=64,
        top_k=8,
        score_func="softmax",
        norm_topk_prob=False,
        aux_loss_coef=0.01,
        z_loss_coef=0.001,
    )
    return ModelConfig(
        vocab_size=50304,
        d_model=2048,
        n_layers=16,
        n_heads=16,
        d_ff=1024,
        max_seq_len=4096,
        rope_theta=1e4,
        norm_eps=1e-5,
        tie_embeddings=False,
        moe=moe,
        qk_norm="full",
    )


def deepseek_v3() -> ModelConfig:
    """DeepSeek-V3 (671B params, 37B active): multi-head latent attention (128 heads, query
    rank 1536, KV rank 512, rope dim 64), group-limited sigmoid routing over 256 experts plus a
    shared one, the first 3 layers dense. The multi-token-prediction module is left out. Max
    seq len is the 4K of pretraining (no YaRN); aux_loss_coef is the sequence-wise balance
    loss weight, applied here per batch."""
    moe = MoEConfig(
        d_model=7168,
        d_ff=2048,
        num_experts=256,
        top_k=8,
        router="two_level",
        score_func="sigmoid",
        norm_topk_prob=True,
        route_scale=2.5,
        num_groups=8,
        top_groups=4,
        group_score="topk_sum",
        group_topk_experts=2,
        aux_loss_coef=1e-4,
        z_loss_coef=0.0,
        bias_update_rate=1e-3,
        num_shared_experts=1,
        init_std=0.006,
    )
    return ModelConfig(
        vocab_size=129280,
        d_model=7168,
        n_layers=61,
        n_heads=128,
        mla=MLAConfig(),
        d_ff=18432,
        max_seq_len=4096,
        rope_theta=1e4,
        norm_eps=1e-6,
        tie_embeddings=False,
        moe=moe,
        first_k_dense=3,
        init_std=0.006,
    )


def deepseek_v2_lite() -> ModelConfig:
    """DeepSeek-V2-Lite (15.7B params, 2.4B active): multi-head latent attention (16 heads,
    no query compression, KV rank 512, rope dim 64), 64 routed experts plus 2 shared, the
    first layer dense. Max seq len is the 4K of pretraining, before YaRN extension."""
    moe = MoEConfig(
        d_model=2048,
        d_ff=1408,
        num_experts=64,
        top_k=6,
        score_func="softmax",
        norm_topk_prob=False,
        aux_loss_coef=1e-3,
        z_loss_coef=0.0,
        num_shared_experts=2,
    )
    return ModelConfig(
        vocab_size=102400,
        d_model=2048,
        n_layers=27,
        n_heads=16,
        mla=MLAConfig(q_lora_rank=None),
        d_ff=10944,
        max_seq_len=4096,
        rope_theta=1e4,
        norm_eps=1e-6,
        tie_embeddings=False,
        moe=moe,
        first_k_dense=1,
    )


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": tiny,
    "moe_300m": moe_300m,
    "mixtral_8x7b": mixtral_8x7b,
    "olmoe_1b_7b": olmoe_1b_7b,
    "deepseek_v3": deepseek_v3,
    "deepseek_v2_lite": deepseek_v2_lite,
}


def get_preset(name: str) -> ModelConfig:
    """A fresh ModelConfig for a named preset."""
    if name not in PRESETS:
        raise ValueError(f"model preset {name!r} is not one of {sorted(PRESETS)}")
    return PRESETS[name]()
