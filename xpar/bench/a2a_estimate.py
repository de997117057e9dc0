"""All-to-all traffic of shape B per rank, off the rank and across nodes, estimated from measured
routing, for flat, rank-dedup and hierarchical dispatch.

Multi-GPU runs cannot be timed here, so this counts instead: tiny models are trained briefly on
the synthetic corpus, and their routers' choices on the validation split say how many rows each
token would send. The routings: shape B's (E=64, k=8; flat top-8, or two-level with 8 groups and
top-4 groups as in the layer benchmark) and a DeepSeek-V3-like one (E=256, k=8, two-level with
8 groups and top-4 groups). The layouts: EP=8 as one node of 8 ranks, and EP=64 as 8 nodes of 8
ranks, consecutive ranks sharing a node (at E=256 each node then holds exactly one group).

Tokens are spread evenly over the ranks (token t on rank t mod P); rows bound for their own rank
stay off the network. Dispatch sends, for each token:
- flat: one row per (token, expert) slot, to the expert's rank;
- rank-dedup: one row per distinct destination rank;
- hierarchical: one row per distinct destination node other than its own, to the rank there
  with its own rank's local index, which then spreads it inside the node, one row per distinct
  destination rank (the ones on the rank it landed on stay there).
Inter-node rows per token are therefore: flat, slots on other nodes; rank-dedup, distinct ranks
on other nodes; hierarchical, distinct other nodes. Bytes are shape B's: T = 16384 tokens per
rank, D = 2048, bf16, per rank, for one MoE layer and one training step (dispatch and combine,
forward and backward: 4 crossings); routing metadata is left out.

The table has one row per routing, layout and dispatch: rows per token (both hops for
hierarchical), those off the rank, those crossing nodes, the gigabytes of each, and the ratio of
each to flat dispatch's at the same routing and layout. One-node layouts have no hierarchical
row: with no node to cross, it is rank-dedup.

Legend: T tokens, K top-k, P EP ranks, L ranks a node.
"""

from __future__ import annotations

import tempfile
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from xpar.config import (
    ModelArch,
    SyntheticDataConfig,
    TrainConfig,
    TrainerConfig,
    model_preset_node,
)
from xpar.data import eval_batches
from xpar.moe import MoEConfig

SHAPE_B_TOKENS, SHAPE_B_DIM, BYTES_PER_VALUE = 16384, 2048, 2
Dispatch = Literal["flat", "rank-dedup", "hierarchical"]
DISPATCHES: tuple[Dispatch, ...] = ("flat", "rank-dedup", "hierarchical")


@dataclass(frozen=True)
class Layout:
    """An EP group of `ep_size` ranks, `ranks_per_node` consecutive ones a node."""

    ep_size: int
    ranks_per_node: int

    @property
    def nodes(self) -> int:
        return self.ep_size // self.ranks_per_node

    def __str__(self) -> str:
        return f"{self.nodes}x{self.ranks_per_node}"


ONE_NODE, EIGHT_NODES = Layout(8, 8), Layout(64, 8)
TWO_LEVEL = dict(router="two_level", num_groups=8, top_groups=4, group_score="topk_sum")
ROUTINGS = {  # name: (the tiny model's MoE fields, the layouts the table shows it at)
    "E64 flat top-8": (dict(num_experts=64, top_k=8, router="topk"), (ONE_NODE, EIGHT_NODES)),
    "E64 two-level 8x8, top-4 groups": (
        dict(num_experts=64, top_k=8, **TWO_LEVEL),
        (ONE_NODE, EIGHT_NODES),
    ),
    "E256 two-level 8x32, top-4 groups": (
        dict(num_experts=256, top_k=8, **TWO_LEVEL),
        (EIGHT_NODES,),
    ),
}


def shape_b_gigabytes(rows_per_token: float) -> float:
    """Per rank, per MoE layer and training step, at shape B."""
    per_row = SHAPE_B_DIM * BYTES_PER_VALUE * 4
    return SHAPE_B_TOKENS * rows_per_token * per_row / 1e9


@dataclass
class Traffic:
    """Rows per token one rank sends, the share that leaves the rank and the share that leaves
    its node."""

    rows_per_token: float
    off_rank_rows_per_token: float
    off_node_rows_per_token: float

    def gigabytes(self) -> float:
        """Off-rank bytes per rank, per MoE layer and training step, at shape B."""
        return shape_b_gigabytes(self.off_rank_rows_per_token)

    def inter_node_gigabytes(self) -> float:
        """Inter-node bytes per rank, per MoE layer and training step, at shape B."""
        return shape_b_gigabytes(self.off_node_rows_per_token)


def first_in_run(sorted_TK: Tensor) -> Tensor:
    """True where a row's sorted value differs from the one before it."""
    first_TK = torch.ones_like(sorted_TK, dtype=torch.bool)
    first_TK[:, 1:] = sorted_TK[:, 1:] != sorted_TK[:, :-1]
    return first_TK


def token_rows(
    topk_idx_TK: Tensor,
    num_experts: int,
    ep_size: int,
    dispatch: Dispatch,
    ranks_per_node: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Each token's rows: ([T] all, [T] off its rank, [T] off its node), for routing
    `topk_idx_TK` at EP=ep_size, `ranks_per_node` consecutive ranks a node (None: one node).
    Token t lives on rank t mod P; see the module docstring for what each dispatch sends."""
    L = ep_size if ranks_per_node is None else ranks_per_node
    if dispatch not in DISPATCHES:
        raise ValueError(f"dispatch={dispatch!r} is not one of {DISPATCHES}")
    if num_experts % ep_size:
        raise ValueError(f"num_experts={num_experts} is not divisible by ep_size={ep_size}")
    if L < 1 or ep_size % L:
        raise ValueError(f"ranks_per_node={L} must be >= 1 and divide ep_size={ep_size}")
    T = topk_idx_TK.shape[0]
    # Sorted so that repeats sit side by side; nodes are runs of ranks, so they sort too.
    rank_TK = (topk_idx_TK // (num_experts // ep_size)).sort(-1).values
    node_TK = rank_TK // L
    home_T = torch.arange(T, device=rank_TK.device) % ep_size
    away_TK = node_TK != (home_T // L)[:, None]
    if dispatch == "flat":
        sent_TK = torch.ones_like(rank_TK, dtype=torch.bool)
        return sent_TK.sum(-1), (rank_TK != home_T[:, None]).sum(-1), away_TK.sum(-1)
    new_rank_TK = first_in_run(rank_TK)
    if dispatch == "rank-dedup":
        off_rank_TK = new_rank_TK & (rank_TK != home_T[:, None])
        return new_rank_TK.sum(-1), off_rank_TK.sum(-1), (new_rank_TK & away_TK).sum(-1)
    node_hop_T = (first_in_run(node_TK) & away_TK).sum(-1)
    landing_TK = node_TK * L + (home_T % L)[:, None]  # where the node hop puts the token
    spread_off_T = (new_rank_TK & (rank_TK != landing_TK)).sum(-1)
    return node_hop_T + new_rank_TK.sum(-1), node_hop_T + spread_off_T, node_hop_T


def traffic(
    topk_idx_TK: Tensor,
    num_experts: int,
    ep_size: int,
    dispatch: Dispatch | bool = "flat",
    ranks_per_node: int | None = None,
) -> Traffic:
    """Mean rows per token for routing `topk_idx_TK` (see `token_rows`). A bool `dispatch` is
    the older dedup flag: True is "rank-dedup", False "flat"."""
    if isinstance(dispatch, bool):
        dispatch = "rank-dedup" if dispatch else "flat"
    counts = token_rows(topk_idx_TK, num_experts, ep_size, dispatch, ranks_per_node)
    return Traffic(*(c.double().mean().item() for c in counts))


def train_tiny(moe_fields: dict, steps: int, device: torch.device, run_dir: Path):
    """The tiny model with MoE fields `moe_fields` (experts, top-k, router), trained `steps`
    steps; its layers are narrowed so that 256 experts still train quickly on a CPU."""
    from xpar.training.trainer import Trainer  # the trainer pulls in the data stack

    node = model_preset_node("tiny")
    moe = MoEConfig(**{**node["moe"], "d_model": 64, "d_ff": 16, **moe_fields})
    cfg = TrainConfig(
        model=ModelArch(**node["model"]),
        moe=moe,
        data=SyntheticDataConfig(vocab_size=256, num_train=4096, num_val=64),
        trainer=TrainerConfig(
            max_steps=steps,
            eval_every=steps,
            save_every=steps,
            log_every=steps,
            device=device.type,
            progress=False,
        ),
        run_name="a2a_estimate",
    )
    trainer = Trainer(cfg, run_dir, {})
    trainer.fit()
    return trainer


@torch.no_grad()
def routing_of(trainer) -> list[Tensor]:
    """Each MoE layer's [T, K] expert choices over the validation split."""
    chosen: list[list[Tensor]] = [[] for _ in trainer.model.moe_layers()]
    hooks = [
        layer.router.register_forward_hook(
            lambda mod, args, out, i=i: chosen[i].append(out.topk_idx_TK.cpu())
        )
        for i, layer in enumerate(trainer.model.moe_layers())
    ]
    trainer.model.eval()
    for tokens_BL in eval_batches(trainer.data.val, 16):
        trainer.model(tokens_BL[:, :-1].to(trainer.device))
    for h in hooks:
        h.remove()
    return [torch.cat(c) for c in chosen]


@dataclass
class Row:
    routing: str
    layout: Layout
    dispatch: Dispatch
    traffic: Traffic
    off_rank_vs_flat: float = 1.0
    inter_node_vs_flat: float | None = None  # None where flat sends nothing across nodes


def table_rows(
    routing: str, layers: list[Tensor], num_experts: int, layouts: tuple[Layout, ...]
) -> list[Row]:
    """Rows of the estimate table for one routing, `layers` its MoE layers' [T, K] choices:
    each layout, each dispatch (hierarchical only across nodes), the mean over the layers."""
    rows = []
    for layout in layouts:
        dispatches = DISPATCHES if layout.nodes > 1 else DISPATCHES[:2]
        for dispatch in dispatches:
            per_layer = [
                astuple(traffic(idx, num_experts, layout.ep_size, dispatch, layout.ranks_per_node))
                for idx in layers
            ]
            mean = Traffic(*(sum(v) / len(layers) for v in zip(*per_layer, strict=True)))
            rows.append(Row(routing, layout, dispatch, mean))
        flat = rows[-len(dispatches)].traffic
        for r in rows[-len(dispatches) :]:
            r.off_rank_vs_flat = r.traffic.off_rank_rows_per_token / flat.off_rank_rows_per_token
            if flat.off_node_rows_per_token:
                r.inter_node_vs_flat = (
                    r.traffic.off_node_rows_per_token / flat.off_node_rows_per_token
                )
    return rows


def estimate(steps: int, device: torch.device) -> list[Row]:
    """Rows of the estimate table: each routing's tiny model trained `steps` steps, at each of
    its layouts, with each dispatch."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (moe_fields, layouts)) in enumerate(ROUTINGS.items()):
            trainer = train_tiny(moe_fields, steps, device, Path(tmp) / str(i))
            rows += table_rows(name, routing_of(trainer), moe_fields["num_experts"], layouts)
    return rows


def print_estimate(rows: list[Row]) -> None:
    print(
        f"\nall-to-all estimate at shape B (T={SHAPE_B_TOKENS} per rank, D={SHAPE_B_DIM}, bf16), "
        f"from the routing of tiny models trained here; per rank, one MoE layer, one training "
        f"step (dispatch + combine, forward + backward); EP ranks as nodes x ranks a node"
    )
    head = (
        f"| {'routing':<33} | {'EP':>3} | nodes | {'dispatch':<12} | rows/token | off-rank "
        f"| inter-node | off-rank GB | inter-node GB | off-rank vs flat | inter-node vs flat |"
    )
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        t = r.traffic
        inter_vs = "-" if r.inter_node_vs_flat is None else f"{r.inter_node_vs_flat:.2f}"
        print(
            f"| {r.routing:<33} | {r.layout.ep_size:>3} | {str(r.layout):<5} | {r.dispatch:<12} "
            f"| {t.rows_per_token:>10.2f} | {t.off_rank_rows_per_token:>8.2f} "
            f"| {t.off_node_rows_per_token:>10.2f} | {t.gigabytes():>11.3f} "
            f"| {t.inter_node_gigabytes():>13.3f} | {r.off_rank_vs_flat:>16.2f} "
            f"| {inter_vs:>18} |"
        )
    print(
        "1x8 is one node: nothing crosses nodes, and hierarchical dispatch is rank-dedup there "
        "(its node hop is empty), so it has no row; hierarchical's rows/token and off-rank count "
        "both hops (to the nodes, then inside them)"
    )
