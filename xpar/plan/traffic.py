"""All-to-all rows under uniform routing: the expectation the planner times, and that the
estimate in xpar.bench.a2a_estimate gives for uniformly random choices.

A row is one token's hidden state bound for one rank (xpar.parallel.dispatcher). Without dedup
every (token, expert) slot is a row; with dedup a token sends one row to each rank it needs.
Uniform routing: every token's K experts are a uniformly random K-subset of the E experts (flat
routers), or of the experts of `top_groups` uniformly chosen groups (two-level). Any rank is then
as likely to be needed as any other, the token's own included, so the rows that leave the rank
are (P - 1) / P of them and those that leave the node (P - G) / P (EP groups are P consecutive
ranks; G GPUs a node).

Legend: E experts, K top-k, P ranks of an EP group, n = E / P experts a rank, G groups (two-level)
or GPUs a node, J top groups, X experts a group.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

from xpar.moe import MoEConfig


def none_of(pool: int, avoid: int, k: int) -> float:
    """Probability that k distinct items drawn uniformly from `pool` miss `avoid` given ones."""
    return comb(pool - avoid, k) / comb(pool, k)


def ranks_touched(moe: MoEConfig, ep_size: int) -> float:
    """Expected number of ranks holding at least one of a token's K experts."""
    E, K, P = moe.num_experts, moe.top_k, ep_size
    n = E // P
    if moe.router != "two_level":
        return P * (1.0 - none_of(E, n, K))
    G, J, X = moe.num_groups, moe.top_groups, moe.experts_per_group
    pool = J * X  # the K experts are drawn from the chosen groups' experts
    if P % G == 0:  # a group spans P / G ranks: only the chosen groups' ranks can be touched
        return J * (P // G) * (1.0 - none_of(pool, n, K))
    g = G // P  # whole groups a rank; c of them chosen, hypergeometrically
    touched = 0.0
    for c in range(1, min(g, J) + 1):
        p_c = comb(g, c) * comb(G - g, J - c) / comb(G, J)
        touched += p_c * (1.0 - none_of(pool, c * X, K))
    return P * touched


@dataclass(frozen=True)
class RowsPerToken:
    """Rows one token sends per MoE layer and dispatch, and those that cross a link."""

    rows: float  # its own rank's included (they are copied, not sent)
    off_rank: float
    off_node: float


def rows_per_token(
    moe: MoEConfig, ep_size: int, dedup: bool, gpus_per_node: int = 8
) -> RowsPerToken:
    """The uniform-routing expectation (see the module docstring); zero at EP=1."""
    P = ep_size
    if P == 1:
        return RowsPerToken(0.0, 0.0, 0.0)
    rows = ranks_touched(moe, P) if dedup else float(moe.top_k)
    return RowsPerToken(rows, rows * (P - 1) / P, rows * max(P - gpus_per_node, 0) / P)
