"""Local dispatch: sort a layer's (token, expert) slots into rows grouped by expert, apply
capacity, and put the expert outputs back as each token's weighted sum.

Legend: T tokens, D model dim, E experts, K top-k, N = T*K slots, M rows handed to experts.
A slot is one (token, choice) pair, numbered n = t*K + k. Every shape here is static given
T, K, E and the config, so nothing waits on the device. The last of the M rows is always a
padding row: dropped slots point at it and weigh zero in combine().
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from xpar.moe.config import MoEConfig


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, cfg: MoEConfig) -> int | None:
    """Slots per expert: max(ceil(cf * T * k / E), min_capacity), never more than T (an expert
    can get each token at most once). None when dropless."""
    if cfg.capacity_factor is None:
        return None
    cap = math.ceil(cfg.capacity_factor * num_tokens * top_k / num_experts)
    return min(max(cap, cfg.min_capacity), num_tokens)


@dataclass
class SlotRoute:
    """Where each slot goes. Rows of one expert are contiguous, experts in order."""

    row_of_slot_N: Tensor  # row in the expert input; num_rows - 1 (padding) for a dropped slot
    rows_per_expert_E: Tensor  # rows each expert owns (kept slots, or the capacity if padded)
    kept_per_expert_E: Tensor  # slots each expert actually computes
    num_rows: int  # M; rows past sum(rows_per_expert_E) are padding, the last one always


def count_per_expert(expert_N: Tensor, num_experts: int) -> Tensor:
    """Slots per expert. Unlike bincount, never waits on the device to size its output."""
    counts_E = expert_N.new_zeros(num_experts)
    return counts_E.scatter_add_(0, expert_N, torch.ones_like(expert_N))


def route_slots(
    topk_idx_TK: Tensor,
    topk_w_TK: Tensor,
    keep_TK: Tensor | None,
    num_experts: int,
    capacity: int | None,
    drop_policy: str = "position",
    pad: bool = False,
) -> SlotRoute:
    """Assign every slot a row, dropping what overflows `capacity`.

    Within an expert, slots keep token order (`position`: the first `capacity` tokens win) or
    go by weight, highest first, ties to the earlier token (`probs`). Router-dropped slots
    (`keep_TK` False) are dropped before capacity is counted.
    """
    num_slots, E = topk_idx_TK.numel(), num_experts
    expert_N = topk_idx_TK.flatten()
    if keep_TK is not None:
        expert_N = torch.where(keep_TK.flatten(), expert_N, E)  # a virtual expert, sorted last
    if capacity is not None and drop_policy == "probs":
        order_N = torch.argsort(-topk_w_TK.flatten(), stable=True)
        order_N = order_N[torch.argsort(expert_N[order_N], stable=True)]
    else:
        order_N = torch.argsort(expert_N, stable=True)
    sorted_expert_N = expert_N[order_N]
    counts_E = count_per_expert(expert_N, E + 1)
    pos_N = (
        torch.arange(num_slots, device=expert_N.device)
        - (counts_E.cumsum(0) - counts_E)[sorted_expert_N]
    )
    real_N = sorted_expert_N < E
    kept_E = counts_E[:E] if capacity is None else counts_E[:E].clamp(max=capacity)
    kept_N = real_N if capacity is None else real_N & (pos_N < capacity)
    safe_expert_N = sorted_expert_N.clamp(max=E - 1)  # the virtual expert's rows are dropped
    if pad:
        num_rows = E * capacity + 1
        rows_E = torch.full_like(kept_E, capacity)
        row_N = safe_expert_N * capacity + pos_N
    else:
        num_rows = (num_slots if capacity is None else min(num_slots, E * capacity)) + 1
        rows_E = kept_E
        row_N = (kept_E.cumsum(0) - kept_E)[safe_expert_N] + pos_N
    row_N = torch.where(kept_N, row_N, num_rows - 1)
    row_of_slot_N = torch.empty_like(row_N).scatter_(0, order_N, row_N)
    return SlotRoute(row_of_slot_N, rows_E, kept_E, num_rows)


class _Permute(torch.autograd.Function):
    """x_TD → x_MD by gathering each row's token; the backward pass is also a gather (the sum
    of a token's K slot gradients), so it is deterministic and needs no atomics. Dropped slots
    read the padding row, whose gradient is zero since it weighs zero in combine()."""

    @staticmethod
    def forward(
        ctx, x_TD: Tensor, token_of_row_M: Tensor, row_of_slot_N: Tensor, top_k: int
    ) -> Tensor:
        ctx.save_for_backward(row_of_slot_N)
        ctx.num_tokens, ctx.top_k = x_TD.shape[0], top_k
        if ctx.num_tokens == 0:  # only the padding row, and no token for it to read
            return x_TD.new_zeros(token_of_row_M.shape[0], x_TD.shape[1])
        return x_TD[token_of_row_M]

    @staticmethod
    def backward(ctx, grad_MD: Tensor):
        (row_of_slot_N,) = ctx.saved_tensors
        grad_TKD = grad_MD[row_of_slot_N].view(ctx.num_tokens, ctx.top_k, grad_MD.shape[1])
        return grad_TKD.sum(1), None, None, None


class _Combine(torch.autograd.Function):
    """out_TD = sum_k w_TK * y_MD[row of slot (t, k)], a dropped slot weighing 0 whatever
    its (padding) row holds. Both backward products are gathers: row m's gradient is its
    slot's weight times its token's gradient, and zero for padding rows, which name the
    sentinel slot N of weight 0."""

    @staticmethod
    def forward(ctx, y_MD, topk_w_TK, kept_TK, row_of_slot_N, slot_of_row_M, token_of_row_M):
        num_tokens, top_k = topk_w_TK.shape
        y_TKD = y_MD[row_of_slot_N].view(num_tokens, top_k, y_MD.shape[1])
        w_TK = topk_w_TK.masked_fill(~kept_TK, 0.0)
        ctx.save_for_backward(y_TKD, w_TK, kept_TK, slot_of_row_M, token_of_row_M)
        return torch.bmm(w_TK.unsqueeze(1).to(y_MD.dtype), y_TKD).squeeze(1)

    @staticmethod
    def backward(ctx, grad_TD: Tensor):
        y_TKD, w_TK, kept_TK, slot_of_row_M, token_of_row_M = ctx.saved_tensors
        grad_y = grad_w = None
        if ctx.needs_input_grad[0] and grad_TD.shape[0] == 0:  # no token: padding rows only
            grad_y = y_TKD.new_zeros(slot_of_row_M.shape[0], grad_TD.shape[1])
        elif ctx.needs_input_grad[0]:
            w_N = torch.cat([w_TK.flatten(), w_TK.new_zeros(1)])
            grad_y = grad_TD[token_of_row_M] * w_N[slot_of_row_M].unsqueeze(1).to(grad_TD.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = torch.bmm(y_TKD, grad_TD.unsqueeze(-1)).squeeze(-1).to(w_TK.dtype)
            grad_w = grad_w.masked_fill_(~kept_TK, 0.0)
        return grad_y, grad_w, None, None, None, None


@dataclass
class A2AStats:
    """What one expert-parallel dispatch sent from this rank (dispatch and combine together).
    Rows count one way, over every hop; bytes are the hidden states there and back plus the
    slot metadata. Rows a rank keeps cross no link: they are in the totals only."""

    rows: int  # rows sent by the all-to-alls
    pair_rows: int  # rows one per (token, expert) pair would have needed
    bytes: int
    recv_slots: int = 0  # (token, expert) slots this rank's experts computed
    inter_rows: int = 0  # rows to ranks on other nodes
    inter_bytes: int = 0
    intra_rows: int = 0  # rows to other ranks of this rank's node
    intra_bytes: int = 0


@dataclass
class DispatchContext:
    """What combine() needs to undo dispatch()."""

    row_of_slot_N: Tensor
    kept_TK: Tensor  # False for dropped slots
    slot_of_row_M: Tensor  # padding rows name the sentinel slot N
    token_of_row_M: Tensor  # padding rows name token T - 1 (any finite row will do)
    topk_w_TK: Tensor
    dropped_fraction: Tensor  # 0-dim, of the T*K slots, router drops included
    stats: A2AStats | None = None  # nothing crosses ranks here


class LocalDispatcher:
    """One rank: rows go to the local experts; the only piece that would ever communicate."""

    def __init__(self, cfg: MoEConfig) -> None:
        self.cfg = cfg

    def load_counts(self, counts_E: Tensor) -> Tensor:
        """The expert load the balancing loss sees: this rank's batch is the whole batch."""
        return counts_E

    def dispatch(
        self, x_TD: Tensor, topk_idx_TK: Tensor, topk_w_TK: Tensor, keep_TK: Tensor | None = None
    ) -> tuple[Tensor, Tensor, DispatchContext]:
        """Returns x_MD grouped by expert, rows per expert, and the context for combine()."""
        num_tokens, top_k = topk_idx_TK.shape
        cfg = self.cfg
        capacity = expert_capacity(num_tokens, cfg.num_experts, top_k, cfg)
        route = route_slots(
            topk_idx_TK,
            topk_w_TK,
            keep_TK,
            cfg.num_experts,
            capacity,
            cfg.drop_policy,
            cfg.pad_to_capacity,
        )
        num_slots, num_rows, dev = topk_idx_TK.numel(), route.num_rows, x_TD.device
        # Invert row_of_slot; dropped slots write to a scratch entry past the last row.
        kept_N = route.row_of_slot_N < num_rows - 1
        dest_N = torch.where(kept_N, route.row_of_slot_N, num_rows)
        slot_of_row_M = torch.full((num_rows + 1,), num_slots, dtype=torch.long, device=dev)
        slot_of_row_M = slot_of_row_M.scatter_(0, dest_N, torch.arange(num_slots, device=dev))
        slot_of_row_M = slot_of_row_M[:num_rows]
        token_of_row_M = (slot_of_row_M // top_k).clamp_(max=num_tokens - 1)
        x_MD = _Permute.apply(x_TD, token_of_row_M, route.row_of_slot_N, top_k)
        dropped = (1.0 - route.kept_per_expert_E.sum() / num_slots).detach()
        ctx = DispatchContext(
            route.row_of_slot_N,
            kept_N.view_as(topk_idx_TK),
            slot_of_row_M,
            token_of_row_M,
            topk_w_TK,
            dropped,
        )
        return x_MD, route.rows_per_expert_E, ctx

    def combine(self, y_MD: Tensor, ctx: DispatchContext) -> Tensor:
        """out_TD = sum_k w_TK * y(row of slot (t, k)) over kept slots."""
        return _Combine.apply(
            y_MD,
            ctx.topk_w_TK,
            ctx.kept_TK,
            ctx.row_of_slot_N,
            ctx.slot_of_row_M,
            ctx.token_of_row_M,
        )
