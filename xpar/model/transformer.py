"""MoETransformerLM: a pre-norm decoder-only LM whose FFNs are MoE layers or dense SwiGLUs.

Math and naming follow HF Llama/Mixtral (RMSNorm in fp32, "rotate_half" rotary), so weights
map across by renaming. Written for one device; parallelism is applied afterwards.

Legend: B batch, S sequence, D model dim, H query heads, G key/value heads (GQA groups),
C head dim, V vocab.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from xpar.model.config import ModelConfig
from xpar.model.mla import MLAttention
from xpar.moe import MoEAux, MoELayer, SwiGLU
from xpar.moe.layer import RoutingTape

RECOMPUTE_MODES = ("none", "experts", "full")


@dataclass
class LMOutput:
    """One forward pass: logits, the LM loss and the MoE layers' auxiliary losses."""

    logits: Tensor  # [B, S, V]
    loss: Tensor | None  # mean cross-entropy over targets != -100; None without targets
    aux_loss: Tensor  # sum of the MoE layers' weighted aux + z losses (0 when none)
    aux: list[MoEAux] = field(default_factory=list)  # one per MoE layer, in layer order

    @property
    def total_loss(self) -> Tensor:
        """The training objective: LM loss plus auxiliary losses."""
        if self.loss is None:
            raise ValueError("LMOutput.total_loss needs targets; forward got targets_BS=None")
        return self.loss + self.aux_loss


class RMSNorm(nn.Module):
    """RMSNorm normalised in fp32 and cast back before the weight, as HF Llama does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_cos_sin(head_dim: int, seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """fp32 cos and sin tables [seq_len, head_dim] in the HF layout (frequencies repeated
    over the two halves of the head dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angle_SC2 = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    angle_SC = torch.cat([angle_SC2, angle_SC2], dim=-1)
    return angle_SC.cos().float(), angle_SC.sin().float()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x_BHSC: Tensor, cos_SC: Tensor, sin_SC: Tensor) -> Tensor:
    """Rotate each pair (x[c], x[c + C/2]) by its position's angle."""
    cos_SC, sin_SC = cos_SC.to(x_BHSC.dtype), sin_SC.to(x_BHSC.dtype)
    return x_BHSC * cos_SC + rotate_half(x_BHSC) * sin_SC


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary positions on q and k, optionally
    RMS-normalised before rotary (`cfg.qk_norm`) and with q/k/v biases (`cfg.attn_bias`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        d_q, d_kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, d_q, bias=cfg.attn_bias)
        self.wk = nn.Linear(cfg.d_model, d_kv, bias=cfg.attn_bias)
        self.wv = nn.Linear(cfg.d_model, d_kv, bias=cfg.attn_bias)
        self.wo = nn.Linear(d_q, cfg.d_model, bias=False)
        # Registered only when used, so models without QK norm keep their state-dict names.
        self.qk_norm = cfg.qk_norm
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if cfg.qk_norm == "head":
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(d_q, cfg.norm_eps)
            self.k_norm = RMSNorm(d_kv, cfg.norm_eps)

    def forward(self, x_BSD: Tensor, cos_SC: Tensor, sin_SC: Tensor) -> Tensor:
        B, S, _ = x_BSD.shape
        q_BSX, k_BSY = self.wq(x_BSD), self.wk(x_BSD)  # X = H*C, Y = G*C
        if self.qk_norm == "full":
            q_BSX, k_BSY = self.q_norm(q_BSX), self.k_norm(k_BSY)
        q_BSHC = q_BSX.view(B, S, self.n_heads, self.head_dim)
        k_BSGC = k_BSY.view(B, S, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q_BSHC, k_BSGC = self.q_norm(q_BSHC), self.k_norm(k_BSGC)
        q_BHSC, k_BGSC = q_BSHC.transpose(1, 2), k_BSGC.transpose(1, 2)
        v_BGSC = self.wv(x_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q_BHSC = apply_rotary(q_BHSC, cos_SC, sin_SC)
        k_BGSC = apply_rotary(k_BGSC, cos_SC, sin_SC)
        o_BHSC = F.scaled_dot_product_attention(
            q_BHSC, k_BGSC, v_BGSC, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.wo(o_BHSC.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))


class Block(nn.Module):
    """x + attn(norm(x)), then + ffn(norm(x)); the FFN is an MoELayer or a dense SwiGLU.

    `recompute`: while training, the block keeps only its input for backward and runs again
    there (torch's non-reentrant checkpoint, which restores the RNG, so jitter noise repeats).
    Its MoE layer replays the routing of the forward pass (RoutingTape); under expert
    parallelism the recompute sends the rows again, which `a2a_bytes` (and its inter- and
    intra-node parts) count.
    """

    def __init__(self, cfg: ModelConfig, moe: bool) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = MLAttention(cfg) if cfg.mla else Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn: MoELayer | SwiGLU
        self.ffn = MoELayer(cfg.moe) if moe else SwiGLU(cfg.d_model, cfg.d_ff)
        self.recompute = False

    def forward(
        self, x_BSD: Tensor, cos_SC: Tensor, sin_SC: Tensor
    ) -> tuple[Tensor, MoEAux | None]:
        if not (self.recompute and self.training and torch.is_grad_enabled()):
            return self._forward(x_BSD, cos_SC, sin_SC)
        tape = RoutingTape() if isinstance(self.ffn, MoELayer) else None
        out_BSD, aux = checkpoint(
            self._forward,
            x_BSD,
            cos_SC,
            sin_SC,
            tape,
            use_reentrant=False,
            context_fn=lambda: (nullcontext(), tape.replay() if tape else nullcontext()),
        )
        if aux is not None and aux.a2a is not None:  # the recompute's dispatch and combine
            a2a = aux.a2a
            aux.a2a = replace(
                a2a,
                bytes=2 * a2a.bytes,
                inter_bytes=2 * a2a.inter_bytes,
                intra_bytes=2 * a2a.intra_bytes,
            )
        return out_BSD, aux

    def _forward(
        self, x_BSD: Tensor, cos_SC: Tensor, sin_SC: Tensor, tape: RoutingTape | None = None
    ) -> tuple[Tensor, MoEAux | None]:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos_SC, sin_SC)
        h_BSD = self.ffn_norm(x_BSD)
        if isinstance(self.ffn, MoELayer):
            y_BSD, aux = self.ffn(h_BSD, tape)
            return x_BSD + y_BSD, aux
        return x_BSD + self.ffn(h_BSD), None


class MoETransformerLM(nn.Module):
    """Token embedding → blocks → final RMSNorm → LM head (tied to the embedding or not)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, cfg.is_moe_layer(i)) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # Tied: no lm_head module, so the state dict holds the matrix once, as `embed.weight`.
        self.lm_head = None
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # Not persistent: derived from the config, so checkpoints stay free of them.
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) weights; output projections (attention wo, FFN and expert w2)
        scaled by 1/sqrt(2 * n_layers) so the residual stream's variance does not grow with
        depth (GPT-2); norms one; balancing biases zero. Also rebuilds the rotary tables, so
        it completes a model built on the meta device and moved with `to_empty`."""
        cfg = self.cfg
        std, depth_scale = cfg.init_std, 1.0 / math.sqrt(2 * cfg.n_layers)
        nn.init.normal_(self.embed.weight, std=std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=std)
        self.norm.weight.fill_(1.0)
        for block in self.layers:
            block.attn_norm.weight.fill_(1.0)
            block.ffn_norm.weight.fill_(1.0)
            if isinstance(block.attn, MLAttention):
                block.attn.reset_parameters(std, out_std=std * depth_scale)
            else:
                _init_attention(block.attn, std, depth_scale)
            if isinstance(block.ffn, MoELayer):
                _init_moe(block.ffn, block.ffn.cfg.init_std, depth_scale)
            else:
                _init_swiglu(block.ffn, std, depth_scale)
        device = self.embed.weight.device
        cos_SC, sin_SC = rope_cos_sin(cfg.rope_dim, cfg.max_seq_len, cfg.rope_theta)
        self.rope_cos, self.rope_sin = cos_SC.to(device), sin_SC.to(device)

    def forward(self, tokens_BS: Tensor, targets_BS: Tensor | None = None) -> LMOutput:
        """Logits for every position, and the mean next-token loss when targets are given
        (targets are already shifted; -100 marks positions to ignore)."""
        x_BSD, auxes = self.hidden_states(tokens_BS)
        head_VD = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits_BSV = F.linear(x_BSD, head_VD)
        loss = None
        if targets_BS is not None:
            # fp32 so a bf16 model's loss is not rounded.
            loss = F.cross_entropy(
                logits_BSV.flatten(0, 1).float(), targets_BS.flatten(), ignore_index=-100
            )
        return LMOutput(
            logits=logits_BSV, loss=loss, aux_loss=total_aux_loss(auxes, x_BSD), aux=auxes
        )

    def hidden_states(self, tokens_BS: Tensor) -> tuple[Tensor, list[MoEAux]]:
        """The final-norm hidden states [B, S, D] (what the LM head and task heads read) and
        the MoE layers' aux outputs."""
        seq_len = tokens_BS.shape[1]
        if seq_len > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {seq_len} exceeds model.max_seq_len={self.cfg.max_seq_len}"
            )
        cos_SC, sin_SC = self.rope_cos[:seq_len], self.rope_sin[:seq_len]
        x_BSD = self.embed(tokens_BS)
        auxes: list[MoEAux] = []
        for block in self.layers:
            x_BSD, aux = block(x_BSD, cos_SC, sin_SC)
            if aux is not None:
                auxes.append(aux)
        return self.norm(x_BSD), auxes

    def set_recompute(self, mode: str, every: int = 1) -> None:
        """Activation recompute (`trainer.recompute`) in layers 0, every, 2 * every, ...:
        `full` recomputes those blocks in backward, `experts` their MoE layers' expert
        activations (see Block and MoELayer), `none` nothing."""
        if mode not in RECOMPUTE_MODES:
            raise ValueError(f"recompute mode {mode!r} is not one of {RECOMPUTE_MODES}")
        for i, block in enumerate(self.layers):
            on = mode != "none" and i % every == 0
            block.recompute = on and mode == "full"
            if isinstance(block.ffn, MoELayer):
                block.ffn.recompute_experts = on and mode == "experts"

    def moe_layers(self) -> list[MoELayer]:
        """The MoE FFNs in layer order (their layer indices are `cfg.moe_layer_ids()`)."""
        return [b.ffn for b in self.layers if isinstance(b.ffn, MoELayer)]

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """One aux-loss-free balancing step in every MoE layer; call once per optimizer step."""
        for layer in self.moe_layers():
            layer.router.update_bias()

    def discard_expert_load(self) -> None:
        """Drop the load tallied for the balancing bias; for an optimizer step that was skipped."""
        for layer in self.moe_layers():
            layer.router.discard_load()

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameters held by this module (the embedding, and untied head, optionally left out)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.embed.weight.numel()
            if self.lm_head is not None:
                n -= self.lm_head.weight.numel()
        return n


def total_aux_loss(auxes: list[MoEAux], like: Tensor) -> Tensor:
    """The sum of the MoE layers' weighted aux losses (fp32; a zero on `like`'s device when
    the model has no MoE layer)."""
    if not auxes:
        return torch.zeros((), device=like.device)
    return torch.stack([a.loss.float() for a in auxes]).sum()


def _init_attention(attn: Attention, std: float, depth_scale: float) -> None:
    for w in (attn.wq, attn.wk, attn.wv):
        nn.init.normal_(w.weight, std=std)
        if w.bias is not None:
            w.bias.zero_()
    nn.init.normal_(attn.wo.weight, std=std * depth_scale)
    for norm in (attn.q_norm, attn.k_norm):
        if norm is not None:
            norm.weight.fill_(1.0)


def _init_swiglu(mlp: SwiGLU, std: float, depth_scale: float) -> None:
    nn.init.normal_(mlp.w1.weight, std=std)
    nn.init.normal_(mlp.w3.weight, std=std)
    nn.init.normal_(mlp.w2.weight, std=std * depth_scale)


def _init_moe(layer: MoELayer, std: float, depth_scale: float) -> None:
    nn.init.normal_(layer.router.gate.weight, std=std)
    group_gate = getattr(layer.router, "group_gate", None)
    if group_gate is not None:
        nn.init.normal_(group_gate.weight, std=std)
    for buf in layer.router.buffers():  # balancing bias and its load tally
        buf.zero_()
    layer.experts.reset_parameters(std, out_std=std * depth_scale)
    if layer.shared_expert is not None:
        _init_swiglu(layer.shared_expert, std, depth_scale)
    if layer.shared_gate is not None:
        nn.init.normal_(layer.shared_gate.weight, std=std)
