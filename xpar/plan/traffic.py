"""All-to-all rows under uniform routing: the expectation the planner times, and that the
estimate in xpar.bench.a2a_estimate gives for uniformly random choices.

A row is one token's hidden state bound for one rank (xpar.parallel.dispatcher). Without dedup
every (token, expert) slot is a row; with dedup a token sends one row to each rank it needs.
Uniform routing: every token's K experts are a uniformly random K-subset of the E experts (flat
routers), or of the experts of `top_groups` uniformly chosen groups (two-level). Any rank is then
as likely to be needed as any other, the token's own included (averaged over the ranks where
nodes straddle groups), so of a token's rows (P - 1) / P leave its rank.

Flat all-to-all (one hop over the EP group of P consecutive ranks, nodes of L GPUs): (P - L) / P
of the rows leave the node and (L - 1) / P go to other ranks of it.

Hierarchical (an EP group spanning N = P / L whole nodes): a token goes once to each node it
needs, to the rank with its own local index there (its own node: no send), so (N - 1) / N of
the nodes it touches take one row each over the network; each of those forwarders then sends
the row (per rank with dedup, per slot without) to the ranks of its node holding the token's
experts, keeping its own: (L - 1) / L of the token's flat rows cross NVLink. Combine sends as
many rows back.

Legend: E experts, K top-k, P ranks of an EP group, L GPUs a node, N nodes an EP group spans,
n experts a block (a rank or a node), G groups, J top groups, X experts a group (two-level).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from math import comb

from xpar.moe import MoEConfig


def none_of(pool: int, avoid: int, k: int) -> float:
    """Probability that k distinct items drawn uniformly from `pool` miss `avoid` given ones."""
    return comb(pool - avoid, k) / comb(pool, k)


def _groups(moe: MoEConfig) -> tuple[int, int, int]:
    """(G, J, X): a flat router is one group, always chosen."""
    if moe.router != "two_level":
        return 1, 1, moe.num_experts
    return moe.num_groups, moe.top_groups, moe.experts_per_group


def _missed(moe: MoEConfig, held_G: tuple[int, ...]) -> float:
    """Probability that a token's K experts miss a block holding held_G[g] experts of group g:
    over the C(G, J) equally likely choices of groups, counted by how many of the block's
    experts they pool (a walk over the groups), none_of that many among the J * X."""
    G, J, X = _groups(moe)
    ways = Counter({(0, 0): 1})  # (groups chosen so far, block experts among them): choices
    for held in held_G:
        step = Counter(ways)  # group left out
        for (chosen, avoid), n in ways.items():
            if chosen < J:
                step[chosen + 1, avoid + held] += n
        ways = step
    pool = J * X
    missed = sum(n * none_of(pool, avoid, moe.top_k) for (c, avoid), n in ways.items() if c == J)
    return missed / comb(G, J)


def blocks_touched(moe: MoEConfig, blocks: int) -> float:
    """Expected number of `blocks` equal consecutive blocks of the experts (ranks, nodes)
    holding at least one of a token's K experts."""
    E = moe.num_experts
    if E % blocks:
        raise ValueError(f"num_experts={E} is not divisible into {blocks} blocks")
    n, (G, _, X) = E // blocks, _groups(moe)
    patterns = Counter(  # blocks alike in how many experts they hold of each group
        tuple(max(0, min((b + 1) * n, (g + 1) * X) - max(b * n, g * X)) for g in range(G))
        for b in range(blocks)
    )
    return sum(count * (1.0 - _missed(moe, held)) for held, count in patterns.items())


def ranks_touched(moe: MoEConfig, ep_size: int) -> float:
    """Expected number of ranks holding at least one of a token's K experts."""
    return blocks_touched(moe, ep_size)


def nodes_touched(moe: MoEConfig, ep_size: int, ranks_per_node: int) -> float:
    """Expected number of the EP group's nodes (ep_size / ranks_per_node of them) holding at
    least one of a token's K experts, the token's own node included."""
    if ep_size % ranks_per_node:
        raise ValueError(f"ep_size={ep_size} is not a whole number of nodes of {ranks_per_node}")
    return blocks_touched(moe, ep_size // ranks_per_node)


@dataclass(frozen=True)
class RowsPerToken:
    """Rows one token sends per MoE layer and dispatch, and those that cross a link."""

    hops: tuple[float, ...]  # rows each hop sends, kept ones included (copied, not sent)
    off_node: float  # over the network
    intra_node: float  # over NVLink, to other ranks of the node

    @property
    def rows(self) -> float:
        return sum(self.hops)

    @property
    def off_rank(self) -> float:
        return self.off_node + self.intra_node


NO_ROWS = RowsPerToken((0.0,), 0.0, 0.0)


def rows_per_token(
    moe: MoEConfig,
    ep_size: int,
    dedup: bool,
    gpus_per_node: int = 8,
    hierarchical: bool = False,
) -> RowsPerToken:
    """The uniform-routing expectation (see the module docstring); zero at EP=1.
    `hierarchical` needs an EP group of whole nodes (ep_size a multiple of gpus_per_node)."""
    P, L = ep_size, gpus_per_node
    if P == 1:
        return NO_ROWS
    rows = ranks_touched(moe, P) if dedup else float(moe.top_k)
    if not hierarchical:
        return RowsPerToken((rows,), rows * max(P - L, 0) / P, rows * (min(P, L) - 1) / P)
    if P <= L or P % L:
        raise ValueError(f"a hierarchical all-to-all needs ep_size={P} to span nodes of {L}")
    nodes = nodes_touched(moe, P, L)
    N = P // L
    return RowsPerToken((nodes, rows), nodes * (N - 1) / N, rows * (L - 1) / L)
