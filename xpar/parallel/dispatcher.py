"""Expert-parallel dispatch: each rank of an EP group holds E / P experts; tokens travel to the
ranks of their experts and back with all-to-all collectives of uneven splits.

Legend: T tokens on this rank, K top-k, N = T * K slots, E experts, P EP ranks, X = E / P
local experts, R rows this rank sends, Q rows it receives, M slots it computes, D model dim.

A row is what crosses the network: one token's hidden state bound for one rank, carrying the
local expert ids and combine weights of its slots there ([K] entries, -1 / 0 for none). Without
dedup every kept slot is its own row; with dedup a token goes once to each rank it needs and
is expanded there, and the ranks sum its partial results before sending one row back.

Capacity is per rank: each rank gives each expert at most ceil(cf * T * k / E) of ITS OWN
slots (T the rank's own tokens), first come or by weight as on one process; so a run at
EP = P equals one process running each rank's batch on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from xpar.moe.config import MoEConfig
from xpar.moe.dispatcher import A2AStats, count_per_expert, expert_capacity, route_slots
from xpar.parallel.comm import all_to_all, exchange_counts, gather_rows, sum_rows


@dataclass
class EPContext:
    """What combine() needs to undo dispatch()."""

    token_rows_TK: Tensor  # the rows each token sent (-1 for none)
    token_of_row_R: Tensor
    row_slots_QK: Tensor  # for each received row, its computed slots (-1 for none)
    row_of_slot_M: Tensor
    w_M: Tensor  # combine weight of each computed slot, differentiable
    send_splits: list[int]
    recv_splits: list[int]
    dropped_fraction: Tensor
    stats: A2AStats


class AllToAllDispatcher:
    """The dispatcher of one MoE layer under expert parallelism (see the module docstring).

    `ep_group` joins the P ranks that share a layer's experts (None: P = 1, nothing moves).
    `stats_group`, when given, sums the balancing-loss load counts over its ranks.
    """

    def __init__(
        self,
        cfg: MoEConfig,
        ep_group: ProcessGroup | None,
        ep_size: int,
        dedup: bool = False,
        stats_group: ProcessGroup | None = None,
    ) -> None:
        if cfg.num_experts % ep_size:
            raise ValueError(f"num_experts={cfg.num_experts} not divisible by ep_size={ep_size}")
        self.cfg, self.ep_group, self.ep_size = cfg, ep_group, ep_size
        self.local_experts = cfg.num_experts // ep_size
        self.dedup, self.stats_group = dedup, stats_group

    def load_counts(self, counts_E: Tensor) -> Tensor:
        if self.stats_group is None:
            return counts_E
        counts_E = counts_E.clone()
        dist.all_reduce(counts_E, group=self.stats_group)
        return counts_E

    def _rows(self, topk_idx_TK: Tensor, kept_N: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Assign kept slots to rows ordered by destination rank, then token.
        Returns (row of each slot, -1 if dropped; whether the slot opens its row; dest_N)."""
        T, K = topk_idx_TK.shape
        n = torch.arange(T * K, device=topk_idx_TK.device)
        dest_N = topk_idx_TK.flatten() // self.local_experts
        key_N = dest_N * T + n // K if self.dedup else dest_N * (T * K) + n
        key_N = torch.where(kept_N, key_N, self.ep_size * T * K)  # dropped slots sort last
        sorted_key, order_N = torch.sort(key_N, stable=True)
        opens = torch.ones_like(kept_N)
        opens[1:] = sorted_key[1:] != sorted_key[:-1]
        opens &= kept_N[order_N]
        row_sorted = torch.cumsum(opens, 0) - 1
        row_N = torch.empty_like(key_N).scatter_(0, order_N, row_sorted)
        opens_N = torch.empty_like(opens).scatter_(0, order_N, opens)
        return torch.where(kept_N, row_N, -1), opens_N, dest_N

    def dispatch(
        self, x_TD: Tensor, topk_idx_TK: Tensor, topk_w_TK: Tensor, keep_TK: Tensor | None = None
    ) -> tuple[Tensor, Tensor, EPContext]:
        """Returns x_MD grouped by local expert, slots per local expert, and the context."""
        cfg, P, X = self.cfg, self.ep_size, self.local_experts
        T, K = topk_idx_TK.shape
        dev = x_TD.device
        capacity = expert_capacity(T, cfg.num_experts, K, cfg)
        route = route_slots(
            topk_idx_TK, topk_w_TK, keep_TK, cfg.num_experts, capacity, cfg.drop_policy
        )
        kept_N = route.row_of_slot_N < route.num_rows - 1
        row_N, opens_N, dest_N = self._rows(topk_idx_TK, kept_N)
        # Counts: rows per destination, and kept slots per (destination, local expert).
        send_rows_P = count_per_expert(torch.where(opens_N, dest_N, P), P + 1)[:P]
        send_slots_PX = route.kept_per_expert_E.view(P, X)
        recv = exchange_counts(torch.cat([send_rows_P[:, None], send_slots_PX], 1), self.ep_group)
        counts = torch.cat([send_rows_P, recv[:, 0], recv[:, 1:].sum(0), send_slots_PX.sum()[None]])
        counts = counts.tolist()  # the one host sync: splits and sizes
        send_splits, recv_splits = counts[:P], counts[P : 2 * P]
        R, Q, M, pairs = sum(send_splits), sum(recv_splits), sum(counts[2 * P : -1]), counts[-1]
        # Source side: the rows, their tokens, and their slots' local experts and weights.
        # The kept slots in order; their number is known now, so no second sync (nonzero's).
        n_kept = torch.sort((~kept_N).to(torch.uint8), stable=True).indices[:pairs]
        r_kept, k_kept = row_N[n_kept], n_kept % K
        token_of_row_R = torch.zeros(R, dtype=torch.long, device=dev)
        token_of_row_R[r_kept] = n_kept // K
        token_rows_TK = torch.where(opens_N, row_N, -1).view(T, K)
        e_RK = torch.full((R, K), -1, dtype=torch.long, device=dev)
        e_RK[r_kept, k_kept] = topk_idx_TK.flatten()[n_kept] % X
        w_RK = topk_w_TK.new_zeros(R, K).index_put((r_kept, k_kept), topk_w_TK.flatten()[n_kept])
        x_RD = gather_rows(x_TD, token_of_row_R, token_rows_TK)
        # Across.
        x_QD = all_to_all(x_RD, recv_splits, send_splits, self.ep_group)
        e_QK = all_to_all(e_RK, recv_splits, send_splits, self.ep_group)
        w_QK = all_to_all(w_RK, recv_splits, send_splits, self.ep_group)
        # Destination side: expand rows to slots grouped by local expert.
        e_flat = torch.where(e_QK >= 0, e_QK, X).flatten()
        slot_order = torch.sort(e_flat, stable=True).indices[:M]  # the M real slots first
        row_of_slot_M = slot_order // K
        row_slots_QK = torch.full((Q * K,), -1, dtype=torch.long, device=dev)
        row_slots_QK[slot_order] = torch.arange(M, device=dev)
        row_slots_QK = row_slots_QK.view(Q, K)
        x_MD = gather_rows(x_QD, row_of_slot_M, row_slots_QK)
        tokens_per_expert_X = recv[:, 1:].sum(0)
        itemsize = x_TD.element_size()
        stats = A2AStats(
            rows=R,
            pair_rows=pairs,
            bytes=2 * R * x_TD.shape[1] * itemsize + R * K * (e_RK.element_size() + 4),
            recv_slots=M,
        )
        dropped = (1.0 - kept_N.sum() / max(T * K, 1)).detach()
        ctx = EPContext(
            token_rows_TK,
            token_of_row_R,
            row_slots_QK,
            row_of_slot_M,
            w_QK.flatten()[slot_order],
            send_splits,
            recv_splits,
            dropped,
            stats,
        )
        return x_MD, tokens_per_expert_X, ctx

    def combine(self, y_MD: Tensor, ctx: EPContext) -> Tensor:
        """out_TD = sum over each token's kept slots of weight * expert output: weighted and
        summed per row where the experts ran, then summed per token back home."""
        y_MD = y_MD * ctx.w_M.unsqueeze(1).to(y_MD.dtype)
        y_QD = sum_rows(y_MD, ctx.row_slots_QK, ctx.row_of_slot_M)
        y_RD = all_to_all(y_QD, ctx.send_splits, ctx.recv_splits, self.ep_group)
        return sum_rows(y_RD, ctx.token_rows_TK, ctx.token_of_row_R)
