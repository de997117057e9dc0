"""Analytic parameter and FLOP counts from a ModelConfig, without building the model, so they
work for models far too large to instantiate (deepseek_v3)."""

from __future__ import annotations

from dataclasses import dataclass

from xpar.model.config import ModelConfig


@dataclass(frozen=True)
class ParamCount:
    """Parameters of a model: all of them, and those one token passes through."""

    total: int  # every parameter: embedding, untied head, all experts
    active: int  # per token: everything dense (embedding and head included), the router,
    # top_k routed experts and the shared experts of each MoE layer
    embedding: int  # token embedding plus the LM head when untied

    @property
    def total_non_embedding(self) -> int:
        return self.total - self.embedding

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding


def attention_params(cfg: ModelConfig) -> int:
    if cfg.mla is not None:
        return cfg.mla.num_params(cfg.d_model, cfg.n_heads)
    d_q, d_kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    n = cfg.d_model * d_q + 2 * cfg.d_model * d_kv + d_q * cfg.d_model  # wq, wk, wv, wo
    if cfg.attn_bias:
        n += d_q + 2 * d_kv
    if cfg.qk_norm == "head":
        n += 2 * cfg.head_dim
    elif cfg.qk_norm == "full":
        n += d_q + d_kv
    return n


def moe_params(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameters of one MoE FFN."""
    moe, d = cfg.moe, cfg.d_model
    assert moe is not None
    router = moe.num_experts * d
    if moe.router == "two_level" and moe.group_score == "learned":
        router += moe.num_groups * d
    expert = 3 * d * moe.d_ff  # w1, w3, w2
    shared = 3 * d * moe.shared_hidden + (d if moe.shared_expert_gate else 0)
    return router + moe.num_experts * expert + shared, router + moe.top_k * expert + shared


def count_params(cfg: ModelConfig) -> ParamCount:
    """Parameter counts equal to `sum(p.numel())` of `MoETransformerLM(cfg)`."""
    d = cfg.d_model
    embedding = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    per_layer = attention_params(cfg) + 2 * d  # + attn_norm, ffn_norm
    total = active = embedding + d + cfg.n_layers * per_layer  # + final norm
    moe_total, moe_active = moe_params(cfg) if cfg.moe is not None else (0, 0)
    dense_ffn = 3 * d * cfg.d_ff
    for i in range(cfg.n_layers):
        moe = cfg.is_moe_layer(i)
        total += moe_total if moe else dense_ffn
        active += moe_active if moe else dense_ffn
    return ParamCount(total=total, active=active, embedding=embedding)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token, PaLM-style (Chowdhery et al. 2022, app. B):

        6 * N + 6 * d_model * vocab + 12 * n_layers * (n_heads * head_dim) * seq_len

    N is the active non-embedding parameter count (each weight a token passes through costs
    2 FLOPs forward and 4 backward); the LM head matmul is counted on its own, whether tied or
    not, and the embedding lookup costs nothing. The last term is attention's QK^T and AV over
    the full S x S score matrix (n_heads * head_dim is d_model unless `attn_head_dim` is
    set); like PaLM it does not halve for the causal mask, so MFU figures compare with
    PaLM/Megatron ones.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    n = count_params(cfg).active_non_embedding
    d, d_q = cfg.d_model, cfg.n_heads * cfg.head_dim
    if cfg.mla is not None:  # QK^T is over C = N + R dims a head, AV over U: their mean
        d_q = cfg.n_heads * (cfg.mla.qk_head_dim + cfg.mla.v_head_dim) / 2
    return 6.0 * n + 6.0 * d * cfg.vocab_size + 12.0 * cfg.n_layers * d_q * seq_len


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def summary(cfg: ModelConfig, seq_len: int) -> str:
    """A few lines describing the model's shape, parameter counts and training FLOPs."""
    p = count_params(cfg)
    moe_ids = cfg.moe_layer_ids()
    lines = [
        f"layers {cfg.n_layers} ({len(moe_ids)} MoE, {cfg.n_layers - len(moe_ids)} dense), "
        f"d_model {cfg.d_model}, heads {cfg.n_heads} (kv {cfg.n_kv_heads}), "
        f"vocab {cfg.vocab_size}, {'tied' if cfg.tie_embeddings else 'untied'} embeddings",
    ]
    if cfg.moe is not None:
        m = cfg.moe
        shared = f", {m.num_shared_experts} shared" if m.num_shared_experts else ""
        lines.append(
            f"MoE: {m.num_experts} experts (d_ff {m.d_ff}), top-{m.top_k}{shared}, "
            f"router {m.router}, layers {_ranges(moe_ids)}"
        )
    lines += [
        f"params: total {_human(p.total)}, active {_human(p.active)} "
        f"(embedding {_human(p.embedding)}; non-embedding total "
        f"{_human(p.total_non_embedding)}, active {_human(p.active_non_embedding)})",
        f"training FLOPs/token at seq_len {seq_len}: {flops_per_token(cfg, seq_len):.3e}",
    ]
    return "\n".join(lines)


def _ranges(ids: list[int]) -> str:
    """Layer ids as compact ranges: [0, 1, 2, 5] -> '0-2,5'."""
    spans: list[list[int]] = []
    for i in ids:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)
