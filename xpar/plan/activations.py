"""Analytic activation memory: the bytes autograd holds for backward after one training forward
pass of one micro-batch, per block and outside the blocks, from a ModelConfig alone (nothing is
built, so it works for deepseek_v3). Each term names the tensors of xpar's model code it stands
for; tests/test_activations.py checks the sums against `xpar.plan.measure`, which counts what
autograd actually saves (storages counted once, parameters left out).

Legend: B micro-batch, S sequence, T = B*S tokens, D model dim, H query heads, G key/value heads,
C head dim, V vocab, E experts, K top-k, F expert hidden dim, M rows the experts compute.
MLA's dims as in xpar.model.mla (Q q_lora_rank, L kv_lora_rank, N nope and R rope head dims,
U v_head_dim); the all-to-all's as in xpar.parallel.dispatcher (P ranks, X = E / P local
experts, R rows a rank sends, Q rows it receives).

Dtypes: the residual stream, the RMSNorms' statistics and the loss's log-softmax are fp32 in
both precisions; under bf16 autocast every matmul output is bf16, and so are the router's
logits and scores (its gate is an autocast Linear; CPU autocast leaves softmax in bf16, where
CUDA's would upcast it: a few [T, E] terms), the rows the experts see and their outputs.
Autocast also makes bf16 copies of every weight a matmul reads, and each Linear that reads an
fp32 activation saves its own bf16 copy of it: those count too.
"""

from __future__ import annotations

from dataclasses import dataclass

from xpar.checks import at_least, one_of
from xpar.model import RECOMPUTE_MODES, ModelConfig
from xpar.moe import MoEConfig
from xpar.moe.dispatcher import expert_capacity
from xpar.plan.traffic import rows_per_token

PRECISIONS = ("fp32", "bf16")
ATTENTION_KERNELS = ("fused", "math")
FP32, INT64, BOOL = 4, 8, 1


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes held for backward by one micro-batch's forward pass."""

    per_layer: list[int]  # held by each block (transformer layer), in layer order
    outside: int  # the batch's token ids, final norm, LM head and loss

    @property
    def total(self) -> int:
        return sum(self.per_layer) + self.outside


@dataclass(frozen=True)
class _Run:
    """What every term needs besides the config."""

    B: int
    S: int
    act: int  # bytes of a matmul output: 4 in fp32, 2 under bf16 autocast
    attention: str  # SDPA kernel: "fused" (flash / memory-efficient) or "math"
    ep_size: int  # P
    dedup: bool  # all-to-all rows: one per (token, rank) instead of one per slot
    all_to_all: bool  # AllToAllDispatcher (else LocalDispatcher)
    weight_copies: bool  # autocast casts fp32 weights to bf16 copies the matmuls save

    @property
    def T(self) -> int:
        return self.B * self.S

    @property
    def autocast(self) -> bool:
        return self.act < FP32


def _read_by_linears(run: _Run, numel: int, linears: int, saved_elsewhere: bool = False) -> int:
    """An fp32 activation that `linears` Linears read: in fp32 they save the tensor itself (one
    storage), unless something else saves it anyway; under autocast each casts it to a bf16
    copy of its own and saves that."""
    if run.autocast:
        return linears * 2 * numel
    return 0 if saved_elsewhere else FP32 * numel


def _weight_copies(run: _Run, numel: int) -> int:
    """bf16 copies of fp32 weights that the matmuls save under autocast (Linear's cached casts,
    GroupedExperts' `w.to(x.dtype)`); none in fp32."""
    return 2 * numel if run.weight_copies else 0


def _rms_norm(rows: int, width: int, in_bytes: int, input_bytes: int) -> int:
    """RMSNorm.forward over [rows, width]: x32 (an fp32 input itself, `input_bytes` of storage
    when nothing saved it before; for a bf16 input its fp32 copy), rsqrt [rows, 1] and `normed`
    cast back to the input dtype (the weight's product keeps it)."""
    x32 = input_bytes if in_bytes == FP32 else FP32 * rows * width
    return x32 + FP32 * rows + in_bytes * rows * width


def _rope_casts(run: _Run, width: int, calls: int) -> int:
    """apply_rotary / apply_rope on a bf16 q or k cast the fp32 cos and sin tables: two [S, width]
    copies per call that the products keep (fp32 tables are buffers, not activations)."""
    return calls * 2 * 2 * run.S * width if run.autocast else 0


def _sdpa(run: _Run, heads: int, kv_heads: int, qk_dim: int, v_dim: int, v_bytes: int) -> int:
    """F.scaled_dot_product_attention, causal. Fused kernels (flash, memory-efficient; CPU's
    flash when q/k and v head dims match) keep q [B, H, S, C], k [B, G, S, C], v as given
    (`v_bytes`: its storage), the output [B, H, S, U] and the fp32 logsumexp [B, H, S]. The
    math kernel keeps sqrt(scale)-scaled q and k, a contiguous v (k and v repeated to all H
    heads) and the softmax [B, H, S, S], all fp32 on CPU even for bf16 inputs."""
    T, B, S, H = run.T, run.B, run.S, heads
    if run.attention == "math":
        return FP32 * (2 * T * H * qk_dim + B * H * S * S + T * H * v_dim)
    q_k_out = run.act * (T * H * qk_dim + T * kv_heads * qk_dim + T * H * v_dim)
    return q_k_out + v_bytes + FP32 * B * H * S


def _qk_norm(cfg: ModelConfig, run: _Run) -> int:
    """Attention's QK norms on the q and k projections' outputs (saved here first): per head
    ("head", rows T*H and T*G of width C) or over the whole projection ("full")."""
    T, H, G, C, a = run.T, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, run.act
    if cfg.qk_norm == "head":
        return _rms_norm(T * H, C, a, a * T * H * C) + _rms_norm(T * G, C, a, a * T * G * C)
    if cfg.qk_norm == "full":
        return _rms_norm(T, H * C, a, a * T * H * C) + _rms_norm(T, G * C, a, a * T * G * C)
    return 0


def _gqa_attention(cfg: ModelConfig, run: _Run) -> int:
    """Attention.forward: wq/wk/wv's input (the attention norm's output [T, D], saved here
    first), QK norms, rotary casts, SDPA (v a view of wv's output), and wo's input: a view of
    a fused kernel's output (laid out like q, [B, S, H, C]), a copy of the math kernel's."""
    T, D, H, G, C, a = run.T, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, run.act
    n = _read_by_linears(run, T * D, 3) + _qk_norm(cfg, run)
    if cfg.qk_norm == "none":  # a normed q or k is fp32 (fp32 weight times bf16): no cast
        n += _rope_casts(run, C, calls=2)
    n += _sdpa(run, H, G, C, C, v_bytes=a * T * G * C)
    if run.attention == "math":
        n += a * T * H * C
    return n + _weight_copies(run, 2 * D * H * C + 2 * D * G * C)


def _mla_attention(cfg: ModelConfig, run: _Run) -> int:
    """MLAttention.forward: its input [T, D] (read by wq or wq_a, and wkv_a), the q latent's
    norm and wq_b's input, the kv latent's norm (its input a view of wkv_a's [T, L + R] output)
    and wkv_b's input, rope casts, SDPA (q and k are cats [B, H, S, C], v a view of wkv_b's
    [T, H*(N + U)] output), and wo's input, a copy (SDPA's output is laid out like q)."""
    mla, T, D, H, a = cfg.mla, run.T, cfg.d_model, cfg.n_heads, run.act
    assert mla is not None
    L, N, R, U = mla.kv_lora_rank, mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
    Q, C = mla.q_lora_rank, N + R
    n = _read_by_linears(run, T * D, 2)
    weights = D * (L + R) + L * H * (N + U) + H * U * D  # wkv_a, wkv_b, wo
    if Q is None:
        weights += D * H * C
    else:
        n += _rms_norm(T, Q, a, a * T * Q) + _read_by_linears(run, T * Q, 1)
        weights += D * Q + Q * H * C
    n += _rms_norm(T, L, a, a * T * (L + R)) + _read_by_linears(run, T * L, 1)
    n += _rope_casts(run, R // 2 if mla.rope_interleave else R, calls=2)
    n += _sdpa(run, H, H, C, U, v_bytes=a * T * H * (N + U))
    return n + a * T * H * U + _weight_copies(run, weights)


def _swiglu_hidden(run: _Run, rows: int, hidden: int) -> int:
    """A SwiGLU's [rows, hidden] tensors: w1 x (silu's input), silu's output and w3 x (the
    product's inputs), and their product (w2's input)."""
    return 4 * run.act * rows * hidden


def _dense_ffn(cfg: ModelConfig, run: _Run) -> int:
    """A dense SwiGLU FFN on the FFN norm's output [T, D] (saved here first)."""
    T, D, F = run.T, cfg.d_model, cfg.d_ff
    return (
        _read_by_linears(run, T * D, 2) + _swiglu_hidden(run, T, F) + _weight_copies(run, 3 * D * F)
    )


def _router(moe: MoEConfig, run: _Run) -> int:
    """TopKRouter / TwoLevelRouter and the balance loss, in the router dtype (the matmul
    dtype): the gate's input (the FFN norm's output [T, D], saved here first), the scores
    [T, E] (softmax or sigmoid output), the top-k ids (a [:, :K] slice of a stable sort's
    [T, E] int64 indices), the z-loss's logits [T, E] and logsumexp [T], load_balance_loss's
    f_E [E]; sigmoid scores' renormalising sum and clamp [T, 1]; top-k renormalisation's sum,
    clamp [T, 1] and gathered weights [T, K]. A learned group gate adds its input, its softmax
    [T, G], the group weights spread over the experts [T, E], their product with the scores
    [T, E], the group logits and logsumexp (and for sigmoid scores the per-group sums [T, G]
    and the renormalised [T, E] the probabilities multiply)."""
    T, D, E, K, r = run.T, moe.d_model, moe.num_experts, moe.top_k, run.act
    n = _read_by_linears(run, T * D, 1) + _weight_copies(run, E * D)
    n += r * T * E + INT64 * T * E + r * (T * E + T) + r * E
    learned = moe.router == "two_level" and moe.group_score == "learned"
    sigmoid = moe.score_func == "sigmoid"
    if learned:
        G = moe.num_groups
        n += _read_by_linears(run, T * D, 1, saved_elsewhere=True) + _weight_copies(run, G * D)
        n += r * T * G + 2 * r * T * E + r * (T * G + T)
        if sigmoid:
            n += 2 * r * T * G + r * T * E
    elif sigmoid:
        n += 2 * r * T
    if moe.norm_topk_prob:
        n += r * (2 * T + T * K)
    return n


def _local_rows(moe: MoEConfig, T: int, pad: bool) -> tuple[int, int]:
    """(M + 1, M): route_slots' rows (the last one padding) and the slots the experts compute,
    every slot kept up to E * capacity (balanced routing; at most that otherwise)."""
    N, E = T * moe.top_k, moe.num_experts
    cap = expert_capacity(T, E, moe.top_k, moe)
    if cap is None:
        return N + 1, N
    if pad:
        return E * cap + 1, E * cap
    kept = min(N, E * cap)
    return kept + 1, kept


def _local_dispatch(moe: MoEConfig, run: _Run) -> int:
    """LocalDispatcher: _Permute's row_of_slot [T*K] int64 and output x_MD [M + 1, D] (the
    experts' input), _Combine's y_TKD [T, K, D], weights [T, K], kept mask [T, K] and
    slot_of_row (a slice of [M + 2]) and token_of_row [M + 1] int64."""
    T, K, D, a = run.T, moe.top_k, moe.d_model, run.act
    rows, _ = _local_rows(moe, T, moe.pad_to_capacity)
    permute = INT64 * T * K + a * rows * D
    return permute + a * T * K * D + a * T * K + BOOL * T * K + INT64 * (2 * rows + 1)


def _a2a_rows(moe: MoEConfig, run: _Run) -> tuple[int, int]:
    """(R, M): rows a rank sends (and, routing uniform, receives: Q = R) and slots it computes
    (as many as it sends). Without dedup a row is a kept slot; with it, a (token, rank) pair."""
    T = run.T
    _, slots = _local_rows(moe, T, pad=False)  # capacity is per rank, never padded
    if not run.dedup:
        return slots, slots
    return round(T * rows_per_token(moe, run.ep_size, dedup=True).rows), slots


def _a2a_dispatch(moe: MoEConfig, run: _Run) -> int:
    """AllToAllDispatcher: the first gather's token_of_row [R] and token_rows [T, K] int64; the
    slot weights' gather index (a slice of a [T*K] sort) and index_put's row and column ids
    [M]; the second gather's row_of_slot [M] and row_slots [Q, K]; w_M's gather index (a slice
    of a [Q*K] sort); x_MD [M, D]; combine's product inputs y_MD [M, D] and w_M [M]."""
    T, K, D, a = run.T, moe.top_k, moe.d_model, run.act
    R, M = _a2a_rows(moe, run)
    Q = R
    indices = (R + T * K) + (T * K + 2 * M) + (M + Q * K) + Q * K
    return INT64 * indices + a * M * D + a * M * D + a * M


def _routed_experts(moe: MoEConfig, run: _Run, recompute: bool) -> int:
    """GroupedExperts over M rows: each expert's SwiGLU tensors and the bf16 copies of the
    X local experts' weights. Recomputed, only what the checkpoint keeps besides x_MD (which
    the dispatch term counts): the rows-per-expert counts, int64 [X] (a slice of [E + 1] for
    the dropless local dispatcher)."""
    T, D, F, a2a = run.T, moe.d_model, moe.d_ff, run.all_to_all
    X = moe.num_experts // run.ep_size
    if recompute:
        sliced = not a2a and moe.capacity_factor is None
        return INT64 * (X + 1 if sliced else X)
    M = _a2a_rows(moe, run)[1] if a2a else _local_rows(moe, T, moe.pad_to_capacity)[1]
    return _swiglu_hidden(run, M, F) + _weight_copies(run, 3 * X * F * D)


def _shared_expert(moe: MoEConfig, run: _Run, recompute: bool) -> int:
    """The shared SwiGLU on the FFN norm's output [T, D] (which the router saved, in fp32) and
    its optional gate: the gate's input, sigmoid [T, 1] and the shared output [T, D] it
    multiplies. Recomputed, the SwiGLU keeps only its checkpoint's input, that fp32 [T, D]:
    new only under autocast, where the router saved a bf16 copy instead."""
    T, D, Fs = run.T, moe.d_model, moe.shared_hidden
    if not Fs:
        return 0
    if recompute:
        n = FP32 * T * D if run.autocast else 0
    else:
        n = _read_by_linears(run, T * D, 2, saved_elsewhere=True)
        n += _swiglu_hidden(run, T, Fs) + _weight_copies(run, 3 * D * Fs)
    if moe.shared_expert_gate:
        n += _read_by_linears(run, T * D, 1, saved_elsewhere=True) + _weight_copies(run, D)
        n += run.act * (T + T * D)
    return n


def _moe_ffn(moe: MoEConfig, run: _Run, recompute: bool) -> int:
    """MoELayer.forward: router, dispatch and combine, routed and shared experts."""
    dispatch = _a2a_dispatch(moe, run) if run.all_to_all else _local_dispatch(moe, run)
    experts = _routed_experts(moe, run, recompute) + _shared_expert(moe, run, recompute)
    return _router(moe, run) + dispatch + experts


def _block(cfg: ModelConfig, run: _Run, i: int, recompute: str, every: int) -> int:
    """Layer i: its two norms (each with its fp32 input: the block's, and the residual stream
    after attention), attention and FFN; a recomputed block only the checkpoint's input."""
    T, D = run.T, cfg.d_model
    on = recompute != "none" and i % every == 0
    if on and recompute == "full":  # x_BSD; cos and sin are buffers
        return FP32 * T * D
    attention = _mla_attention if cfg.mla is not None else _gqa_attention
    n = 2 * _rms_norm(T, D, FP32, FP32 * T * D) + attention(cfg, run)
    if cfg.moe is not None and cfg.is_moe_layer(i):
        return n + _moe_ffn(cfg.moe, run, recompute=on)
    return n + _dense_ffn(cfg, run)


def _outside(cfg: ModelConfig, run: _Run) -> int:
    """The embedding's token ids (a view of the [B, S + 1] batch), the final norm with the last
    block's output, the LM head's input (and the bf16 copy of its weight, the embedding's when
    tied), cross-entropy's fp32 log-softmax [T, V], flattened targets (a copy of the [:, 1:]
    slice) and total weight. The logits themselves are not saved."""
    B, S, T, D, V = run.B, run.S, run.T, cfg.d_model, cfg.vocab_size
    n = INT64 * B * (S + 1) + _rms_norm(T, D, FP32, FP32 * T * D)
    n += _read_by_linears(run, T * D, 1) + _weight_copies(run, V * D)
    return n + FP32 * T * V + INT64 * T + FP32


def _check(cfg: ModelConfig, micro_batch: int, seq_len: int, every: int, ep_size: int) -> None:
    at_least("data.micro_batch_size", micro_batch, 1)
    at_least("data.seq_len", seq_len, 1)
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"data.seq_len={seq_len} exceeds model.max_seq_len={cfg.max_seq_len}")
    at_least("trainer.recompute_layers", every, 1)
    at_least("parallel.ep_size", ep_size, 1)
    if cfg.moe is not None and cfg.moe.num_experts % ep_size:
        raise ValueError(
            f"moe.num_experts={cfg.moe.num_experts} is not divisible by parallel.ep_size={ep_size}"
        )


def activation_bytes(
    cfg: ModelConfig,
    micro_batch: int,
    seq_len: int,
    recompute: str = "none",
    recompute_layers: int = 1,
    precision: str = "fp32",
    ep_size: int = 1,
    dedup: bool = False,
    *,
    attention: str = "fused",
    all_to_all: bool | None = None,
    bf16_weights: bool = False,
) -> ActivationBytes:
    """Bytes one micro-batch of `micro_batch` sequences of `seq_len` tokens holds for backward
    (see the module docstring), with `recompute` in layers 0, recompute_layers, 2 *
    recompute_layers, ... as `MoETransformerLM.set_recompute` sets it. `precision="bf16"` is
    bf16 autocast over fp32 weights.

    The all-to-all dispatcher (`ep_size` > 1; `all_to_all=True` for training on several
    processes at ep_size 1, which uses it too) is counted for uniform routing: a rank receives
    as many rows and slots as it sends, rows one per slot, or with `dedup` one per (token,
    rank). Routed slots are all kept up to E * capacity: what balanced routing keeps, at most
    that otherwise. `attention="math"` is the SDPA kernel CPU falls back to when q/k and v head
    dims differ (MLA with v_head_dim != qk_head_dim); GPUs run a fused one.
    `bf16_weights`: the weights are bf16 themselves (DeepSpeed's bf16 casts the module), so
    autocast makes no copies of them; the residual stream is still counted fp32, a few [T, D]
    a layer more than such a run holds.
    """
    one_of("trainer.recompute", recompute, RECOMPUTE_MODES)
    one_of("trainer.precision", precision, PRECISIONS)
    one_of("attention", attention, ATTENTION_KERNELS)
    _check(cfg, micro_batch, seq_len, recompute_layers, ep_size)
    run = _Run(
        B=micro_batch,
        S=seq_len,
        act=FP32 if precision == "fp32" else 2,
        attention=attention,
        ep_size=ep_size,
        dedup=dedup,
        all_to_all=ep_size > 1 if all_to_all is None else all_to_all,
        weight_copies=precision == "bf16" and not bf16_weights,
    )
    per_layer = [_block(cfg, run, i, recompute, recompute_layers) for i in range(cfg.n_layers)]
    return ActivationBytes(per_layer=per_layer, outside=_outside(cfg, run))
