"""Multi-head latent attention (MLA, DeepSeek-V2/V3): keys and values are expanded per head from
one small compressed latent per token, and positions enter through a separate rotary part whose
key is shared by all heads. The math equals transformers' DeepseekV3Attention (without YaRN).

Legend: B batch, S sequence, D model dim, H heads, Q q_lora_rank (query latent),
L kv_lora_rank (key/value latent), N qk_nope_head_dim, R qk_rope_head_dim, C = N + R (query and
key head dim), U v_head_dim.

State-dict names under `layers.i.attn.` (HF DeepseekV3 name in brackets):
    wq.weight [H*C, D]          (q_proj)             when q_lora_rank is None; else
    wq_a.weight [Q, D]          (q_a_proj)
    q_norm.weight [Q]           (q_a_layernorm)
    wq_b.weight [H*C, Q]        (q_b_proj)
    wkv_a.weight [L + R, D]     (kv_a_proj_with_mqa)  latent, then the shared rotary key
    kv_norm.weight [L]          (kv_a_layernorm)
    wkv_b.weight [H*(N + U), L] (kv_b_proj)           per head: nope key, then value
    wo.weight [D, H*U]          (o_proj)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xpar.checks import at_least

if TYPE_CHECKING:
    from xpar.model.config import ModelConfig

# DeepSeek's reference code and transformers build the q/kv latent norms with their default
# eps, whatever the model's norm eps is.
LATENT_NORM_EPS = 1e-6


@dataclass
class MLAConfig:
    """Multi-head latent attention dims (names and defaults as in HF's DeepseekV3Config, whose
    defaults are DeepSeek-V3's). The query and key head dim is qk_nope_head_dim +
    qk_rope_head_dim; the value head dim may differ. `rope_interleave` rotates adjacent pairs
    (x0, x1), (x2, x3), ... of the rotary part (DeepSeek's checkpoints) instead of the halves."""

    q_lora_rank: int | None = 1536  # None: a full-rank query projection
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_interleave: bool = True

    def __post_init__(self) -> None:
        if self.q_lora_rank is not None:
            at_least("model.mla.q_lora_rank", self.q_lora_rank, 1)
        at_least("model.mla.kv_lora_rank", self.kv_lora_rank, 1)
        at_least("model.mla.qk_nope_head_dim", self.qk_nope_head_dim, 1)
        at_least("model.mla.qk_rope_head_dim", self.qk_rope_head_dim, 2)
        at_least("model.mla.v_head_dim", self.v_head_dim, 1)
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"model.mla.qk_rope_head_dim={self.qk_rope_head_dim} must be even "
                f"(rotary embeddings rotate pairs)"
            )

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def num_params(self, d_model: int, n_heads: int) -> int:
        """Parameters of one MLAttention (projections and latent norms)."""
        H, D = n_heads, d_model
        if self.q_lora_rank is None:
            q = D * H * self.qk_head_dim
        else:
            q = (D + 1 + H * self.qk_head_dim) * self.q_lora_rank  # wq_a, q_norm, wq_b
        kv_a = D * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv_b = self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv_a + kv_b + H * self.v_head_dim * D  # ... + wo


def apply_rope(x_BHSR: Tensor, cos_SR: Tensor, sin_SR: Tensor, interleave: bool) -> Tensor:
    """Rotary positions on the rotary part. Interleaved, pair (x[2i], x[2i+1]) turns by angle i
    and the result comes out de-interleaved (rotated evens, then odds) as in HF: queries and keys
    get the same permutation, so their dot products are unchanged."""
    from xpar.model.transformer import apply_rotary  # transformer imports this module

    if not interleave:
        return apply_rotary(x_BHSR, cos_SR, sin_SR)
    half = cos_SR.shape[-1] // 2  # the tables repeat the angles over their two halves
    cos_SR2 = cos_SR[:, :half].to(x_BHSR.dtype)
    sin_SR2 = sin_SR[:, :half].to(x_BHSR.dtype)
    even_BHSR2, odd_BHSR2 = x_BHSR[..., 0::2], x_BHSR[..., 1::2]
    return torch.cat(
        [even_BHSR2 * cos_SR2 - odd_BHSR2 * sin_SR2, odd_BHSR2 * cos_SR2 + even_BHSR2 * sin_SR2],
        dim=-1,
    )


class MLAttention(nn.Module):
    """Causal multi-head latent attention; takes rotary tables [S, R] for the rotary part."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        from xpar.model.transformer import RMSNorm  # transformer imports this module

        mla = cfg.mla
        if mla is None:
            raise ValueError("MLAttention needs model.mla to be set")
        self.mla, self.n_heads = mla, cfg.n_heads
        H, D, C = cfg.n_heads, cfg.d_model, mla.qk_head_dim
        self.wq = self.wq_a = self.q_norm = self.wq_b = None
        if mla.q_lora_rank is None:
            self.wq = nn.Linear(D, H * C, bias=False)
        else:
            self.wq_a = nn.Linear(D, mla.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(mla.q_lora_rank, LATENT_NORM_EPS)
            self.wq_b = nn.Linear(mla.q_lora_rank, H * C, bias=False)
        self.wkv_a = nn.Linear(D, mla.kv_lora_rank + mla.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(mla.kv_lora_rank, LATENT_NORM_EPS)
        self.wkv_b = nn.Linear(
            mla.kv_lora_rank, H * (mla.qk_nope_head_dim + mla.v_head_dim), bias=False
        )
        self.wo = nn.Linear(H * mla.v_head_dim, D, bias=False)

    @torch.no_grad()
    def reset_parameters(self, std: float, out_std: float) -> None:
        """Normal(0, std) projections, Normal(0, out_std) output projection, norms one."""
        for linear in (self.wq, self.wq_a, self.wq_b, self.wkv_a, self.wkv_b):
            if linear is not None:
                nn.init.normal_(linear.weight, std=std)
        nn.init.normal_(self.wo.weight, std=out_std)
        for norm in (self.q_norm, self.kv_norm):
            if norm is not None:
                norm.weight.fill_(1.0)

    def forward(self, x_BSD: Tensor, cos_SR: Tensor, sin_SR: Tensor) -> Tensor:
        mla, H = self.mla, self.n_heads
        N, R, U, L = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim, mla.kv_lora_rank
        B, S, _ = x_BSD.shape
        # X = H * C
        q_BSX = self.wq(x_BSD) if self.wq else self.wq_b(self.q_norm(self.wq_a(x_BSD)))
        q_BHSC = q_BSX.view(B, S, H, N + R).transpose(1, 2)
        q_nope_BHSN, q_rope_BHSR = q_BHSC.split([N, R], dim=-1)

        latent_BSL, k_rope_BSR = self.wkv_a(x_BSD).split([L, R], dim=-1)
        kv_BHSY = self.wkv_b(self.kv_norm(latent_BSL)).view(B, S, H, N + U).transpose(1, 2)
        k_nope_BHSN, v_BHSU = kv_BHSY.split([N, U], dim=-1)

        q_rope_BHSR = apply_rope(q_rope_BHSR, cos_SR, sin_SR, mla.rope_interleave)
        k_rope_B1SR = apply_rope(k_rope_BSR.unsqueeze(1), cos_SR, sin_SR, mla.rope_interleave)
        q_BHSC = torch.cat([q_nope_BHSN, q_rope_BHSR], dim=-1)
        k_BHSC = torch.cat([k_nope_BHSN, k_rope_B1SR.expand(B, H, S, R)], dim=-1)
        # SDPA's default scale is C**-0.5, DeepSeek's softmax scale without YaRN.
        o_BHSU = F.scaled_dot_product_attention(q_BHSC, k_BHSC, v_BHSU, is_causal=True)
        return self.wo(o_BHSU.transpose(1, 2).reshape(B, S, H * U))
