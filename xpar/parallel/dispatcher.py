"""Expert-parallel dispatch: each rank of an EP group holds E / P experts; tokens travel to the
ranks of their experts and back with all-to-all collectives of uneven splits.

Legend: T tokens on this rank, K top-k, N = T * K slots, E experts, P EP ranks, X = E / P
local experts, G nodes an EP group spans, L = P / G of its ranks a node, I items a hop sends
from (tokens, or the rows an earlier hop received), R rows a hop sends, Q rows it receives,
M slots this rank computes, D model dim.

A row is what crosses the network: one hidden state bound for one rank, carrying the global
expert ids and combine weights of its slots there ([K] entries, -1 / 0 for none). Without
dedup every kept slot is its own row; with dedup a token goes once to each rank it needs and
is expanded there, and the ranks sum its partial results before sending one row back.

The exchange is one hop (flat: the EP group's all-to-all) or two (hierarchical, for an EP group
spanning nodes, as DeepEP and Tutel's 2DH all-to-all do): first each token goes once to each
node it needs, to the rank there with its own rank's local index (an all-to-all of the G ranks
sharing that index, one per node); that rank then spreads it inside the node to the ranks of its
experts (an all-to-all of the node's L ranks; per rank, or per slot without dedup). Combine
runs the hops backwards: partial results are summed where each hop expanded a row, so one row
per (token, node) crosses nodes each way. A hop's splits are all known before the first row
moves: the source counts what every later hop will forward, so a dispatch waits on the device
once, however many hops.

Capacity is per rank: each rank gives each expert at most ceil(cf * T * k / E) of ITS OWN
slots (T the rank's own tokens), first come or by weight as on one process; so a run at
EP = P equals one process running each rank's batch on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from xpar.moe.config import MoEConfig
from xpar.moe.dispatcher import A2AStats, expert_capacity, route_slots
from xpar.parallel.comm import all_to_all, exchange_counts, gather_rows, sum_rows
from xpar.parallel.mesh import EPNodes


@dataclass
class _Route:
    """Where one hop sends: over `group`, whose ranks are EP ranks `peers`, to the destination
    `dest_of` gives a global expert id, once per (item, destination) with `dedup`."""

    group: ProcessGroup | None
    peers: list[int]
    dest_of: Callable[[Tensor], Tensor]
    dedup: bool


@dataclass
class _Hop:
    """One exchange over `group` and what its reverse needs: the rows each item sent and the
    item of each row (the tables combine sums by), and the splits both ways."""

    group: ProcessGroup | None
    rows_of_item_IK: Tensor  # -1 for none
    item_of_row_R: Tensor
    send_splits: list[int]
    recv_splits: list[int]


@dataclass
class EPContext:
    """What combine() needs to undo dispatch()."""

    hops: list[_Hop]
    row_slots_QK: Tensor  # for each row the last hop received, its computed slots (-1 none)
    row_of_slot_M: Tensor
    w_M: Tensor  # combine weight of each computed slot, differentiable
    dropped_fraction: Tensor
    stats: A2AStats


def _distinct(dest_IK: Tensor, live_IK: Tensor, size: int) -> Tensor:
    """[size] items with at least one live entry bound for each destination."""
    hit_IS = torch.zeros(dest_IK.shape[0], size + 1, dtype=torch.bool, device=dest_IK.device)
    hit_IS.scatter_(1, torch.where(live_IK, dest_IK, size), True)
    return hit_IS[:, :size].sum(0)


def _row_per_entry(dest_IK: Tensor, live_IK: Tensor, dedup: bool, size: int):
    """Assign live entries to rows ordered by destination, then item (with dedup one row per
    (destination, item), else one per entry). Returns (row of each entry, -1 if not live;
    whether the entry opens its row), both flat [I * K]."""
    items, K = dest_IK.shape
    n = torch.arange(items * K, device=dest_IK.device)
    live_N = live_IK.flatten()
    dest_N = dest_IK.flatten()
    key_N = dest_N * items + n // K if dedup else dest_N * (items * K) + n
    key_N = torch.where(live_N, key_N, size * items * K)  # dead entries sort last
    sorted_key, order_N = torch.sort(key_N, stable=True)
    opens = torch.ones_like(live_N)
    opens[1:] = sorted_key[1:] != sorted_key[:-1]
    opens &= live_N[order_N]
    row_N = torch.empty_like(key_N).scatter_(0, order_N, torch.cumsum(opens, 0) - 1)
    opens_N = torch.empty_like(opens).scatter_(0, order_N, opens)
    return torch.where(live_N, row_N, -1), opens_N


def _send(x_ID, e_IK, w_IK, dest_IK, live_IK, dedup, size, splits, num_live, group):
    """One hop: the items' live entries, as rows, to `group`'s ranks; `splits` are (send,
    receive) row counts and `num_live` the live entries, known beforehand. Returns the rows
    received (hidden states, expert ids, weights) and the hop."""
    K = e_IK.shape[1]
    send_splits, recv_splits = splits
    row_N, opens_N = _row_per_entry(dest_IK, live_IK, dedup, size)
    live_n = torch.sort((~live_IK.flatten()).to(torch.uint8), stable=True).indices[:num_live]
    r_live, k_live = row_N[live_n], live_n % K
    R = sum(send_splits)
    item_of_row_R = torch.zeros(R, dtype=torch.long, device=x_ID.device)
    item_of_row_R[r_live] = live_n // K
    rows_of_item_IK = torch.where(opens_N, row_N, -1).view_as(e_IK)
    e_RK = torch.full((R, K), -1, dtype=torch.long, device=x_ID.device)
    e_RK[r_live, k_live] = e_IK.flatten()[live_n]
    w_RK = w_IK.new_zeros(R, K).index_put((r_live, k_live), w_IK.flatten()[live_n])
    x_RD = gather_rows(x_ID, item_of_row_R, rows_of_item_IK)
    hop = _Hop(group, rows_of_item_IK, item_of_row_R, send_splits, recv_splits)
    received = [all_to_all(t, recv_splits, send_splits, group) for t in (x_RD, e_RK, w_RK)]
    return (*received, hop)


class AllToAllDispatcher:
    """The dispatcher of one MoE layer under expert parallelism (see the module docstring).

    `ep_group` joins the P ranks that share a layer's experts (None: P = 1, nothing moves).
    `stats_group`, when given, sums the balancing-loss load counts over its ranks. `nodes` says
    where the EP ranks sit (their traffic is counted per link class) and, when hierarchical,
    gives the two hops' groups; None: all on one node.
    """

    def __init__(
        self,
        cfg: MoEConfig,
        ep_group: ProcessGroup | None,
        ep_size: int,
        dedup: bool = False,
        stats_group: ProcessGroup | None = None,
        nodes: EPNodes | None = None,
    ) -> None:
        if cfg.num_experts % ep_size:
            raise ValueError(f"num_experts={cfg.num_experts} not divisible by ep_size={ep_size}")
        self.cfg, self.ep_group, self.ep_size = cfg, ep_group, ep_size
        self.local_experts = cfg.num_experts // ep_size
        self.dedup, self.stats_group = dedup, stats_group
        self.nodes = nodes or EPNodes((0,) * ep_size, ep_size)
        self.ep_rank = dist.get_rank(ep_group) if ep_group is not None else 0

    def load_counts(self, counts_E: Tensor) -> Tensor:
        if self.stats_group is None:
            return counts_E
        counts_E = counts_E.clone()
        dist.all_reduce(counts_E, group=self.stats_group)
        return counts_E

    def _links(self, peers: list[int], splits: list[int]) -> tuple[int, int]:
        """(rows to other nodes, rows to other ranks of this node) among `splits` rows sent to
        EP ranks `peers`; rows a rank keeps cross no link."""
        node_of, me = self.nodes.node_of, self.ep_rank
        inter = sum(n for p, n in zip(peers, splits, strict=True) if node_of[p] != node_of[me])
        intra = sum(
            n for p, n in zip(peers, splits, strict=True) if p != me and node_of[p] == node_of[me]
        )
        return inter, intra

    def dispatch(
        self, x_TD: Tensor, topk_idx_TK: Tensor, topk_w_TK: Tensor, keep_TK: Tensor | None = None
    ) -> tuple[Tensor, Tensor, EPContext]:
        """Returns x_MD grouped by local expert, slots per local expert, and the context."""
        cfg, X = self.cfg, self.local_experts
        T, K = topk_idx_TK.shape
        capacity = expert_capacity(T, cfg.num_experts, K, cfg)
        slots = route_slots(
            topk_idx_TK, topk_w_TK, keep_TK, cfg.num_experts, capacity, cfg.drop_policy
        )
        kept_TK = (slots.row_of_slot_N < slots.num_rows - 1).view(T, K)
        rank_TK = topk_idx_TK // X
        plan = self._plan_hierarchical if self.nodes.hierarchical else self._plan_flat
        counts, tokens_per_expert_X, routes = plan(rank_TK, kept_TK, slots.kept_per_expert_E)
        counts = counts.tolist()  # the one host sync: every hop's splits and sizes
        M, pairs = counts[-2], counts[-1]
        x, e, w, live, hops = x_TD, topk_idx_TK, topk_w_TK, kept_TK, []
        inter = intra = at = 0
        for r in routes:  # each hop's counts: [send S, receive S, live entries]
            S = len(r.peers)
            splits = counts[at : at + S], counts[at + S : at + 2 * S]
            num_live, at = counts[at + 2 * S], at + 2 * S + 1
            x, e, w, hop = _send(x, e, w, r.dest_of(e), live, r.dedup, S, splits, num_live, r.group)
            live = e >= 0
            hops.append(hop)
            hop_inter, hop_intra = self._links(r.peers, hop.send_splits)
            inter, intra = inter + hop_inter, intra + hop_intra
        # Destination side: expand rows to slots grouped by local expert.
        Q = x.shape[0]
        e_flat = torch.where(live, e % X, X).flatten()
        slot_order = torch.sort(e_flat, stable=True).indices[:M]  # the M real slots first
        row_of_slot_M = slot_order // K
        row_slots_QK = torch.full((Q * K,), -1, dtype=torch.long, device=x_TD.device)
        row_slots_QK[slot_order] = torch.arange(M, device=x_TD.device)
        row_slots_QK = row_slots_QK.view(Q, K)
        x_MD = gather_rows(x, row_of_slot_M, row_slots_QK)
        row_bytes = 2 * x_TD.shape[1] * x_TD.element_size() + K * (8 + 4)
        rows = sum(sum(h.send_splits) for h in hops)
        stats = A2AStats(
            rows=rows,
            pair_rows=pairs,
            bytes=rows * row_bytes,
            recv_slots=M,
            inter_rows=inter,
            inter_bytes=inter * row_bytes,
            intra_rows=intra,
            intra_bytes=intra * row_bytes,
        )
        dropped = (1.0 - kept_TK.sum() / max(T * K, 1)).detach()
        ctx = EPContext(hops, row_slots_QK, row_of_slot_M, w.flatten()[slot_order], dropped, stats)
        return x_MD, tokens_per_expert_X, ctx

    def _plan_flat(self, rank_TK, kept_TK, kept_E):
        """One hop over the EP group: counts [send P, receive P, live, M, pairs], slots per
        local expert, and the route."""
        P, X = self.ep_size, self.local_experts
        send_slots_PX = kept_E.view(P, X)
        send_rows_P = _distinct(rank_TK, kept_TK, P) if self.dedup else send_slots_PX.sum(1)
        recv = exchange_counts(torch.cat([send_rows_P[:, None], send_slots_PX], 1), self.ep_group)
        tokens_per_expert_X = recv[:, 1:].sum(0)
        pairs = kept_E.sum()
        counts = torch.cat(
            [send_rows_P, recv[:, 0], pairs[None], tokens_per_expert_X.sum()[None], pairs[None]]
        )
        route = _Route(self.ep_group, list(range(P)), lambda e: e // X, self.dedup)
        return counts, tokens_per_expert_X, [route]

    def _plan_hierarchical(self, rank_TK, kept_TK, kept_E):
        """Two hops, nodes then ranks inside the node (see the module docstring). The source
        counts, per node, its rows there and the rows and slots that node's forwarder will
        send to each of its ranks; the forwarders sum what they get and tell their node's
        ranks. Counts: [hop 1 send G, receive G, live; hop 2 send L, receive L, live; M,
        pairs]."""
        L, X = self.nodes.per_node, self.local_experts
        G = self.ep_size // L
        rows1_G = _distinct(rank_TK // L, kept_TK, G)
        slots_GLX = kept_E.view(G, L, X)
        rows2_GL = (  # the rows each node's forwarder will send to each of its ranks
            _distinct(rank_TK, kept_TK, G * L).view(G, L) if self.dedup else slots_GLX.sum(2)
        )
        send1 = torch.cat([rows1_G[:, None], rows2_GL, slots_GLX.flatten(1)], 1)
        recv1 = exchange_counts(send1, self.nodes.inter)
        rows2_L = recv1[:, 1 : 1 + L].sum(0)
        slots_LX = recv1[:, 1 + L :].view(G, L, X).sum(0)
        recv2 = exchange_counts(torch.cat([rows2_L[:, None], slots_LX], 1), self.nodes.intra)
        tokens_per_expert_X = recv2[:, 1:].sum(0)
        pairs = kept_E.sum()
        counts = torch.cat(
            [
                rows1_G,
                recv1[:, 0],
                pairs[None],
                rows2_L,
                recv2[:, 0],
                slots_LX.sum()[None],
                tokens_per_expert_X.sum()[None],
                pairs[None],
            ]
        )
        me_node, me_local = divmod(self.ep_rank, L)
        to_nodes = _Route(
            self.nodes.inter, [n * L + me_local for n in range(G)], lambda e: e // (X * L), True
        )
        in_node = _Route(
            self.nodes.intra, [me_node * L + i for i in range(L)], lambda e: e // X % L, self.dedup
        )
        return counts, tokens_per_expert_X, [to_nodes, in_node]

    def combine(self, y_MD: Tensor, ctx: EPContext) -> Tensor:
        """out_TD = sum over each token's kept slots of weight * expert output: weighted and
        summed per row where the experts ran, then summed per row back through each hop."""
        y_MD = y_MD * ctx.w_M.unsqueeze(1).to(y_MD.dtype)
        y_QD = sum_rows(y_MD, ctx.row_slots_QK, ctx.row_of_slot_M)
        for hop in reversed(ctx.hops):
            y_RD = all_to_all(y_QD, hop.send_splits, hop.recv_splits, hop.group)
            y_QD = sum_rows(y_RD, hop.rows_of_item_IK, hop.item_of_row_R)
        return y_QD
