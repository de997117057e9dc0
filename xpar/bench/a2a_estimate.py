"""All-to-all traffic of shape B at EP=8 and EP=64, estimated from measured routing.

Multi-GPU runs cannot be timed here, so this counts instead: tiny models with shape B's routing
(64 experts, top-8; flat, or two-level with 8 groups and top-4 groups as in the layer
benchmark) are trained briefly on the synthetic corpus, and their routers' choices on the
validation split say how many rows each token would send at a given EP size: one per
(token, expert) pair without dedup, one per distinct destination rank with it. Tokens are
spread evenly over the ranks (token t on rank t mod P); rows bound for their own rank stay off
the network. Bytes are shape B's: T = 16384 tokens per rank, D = 2048, bf16, for one MoE layer
and one training step (dispatch and combine, forward and backward: 4 crossings).

Legend: T tokens, K top-k, P EP ranks, X = E / P experts per rank.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

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
EP_SIZES = (8, 64)
ROUTINGS = {
    "flat top-8": dict(router="topk"),
    "two-level 8x8, top-4 groups": dict(
        router="two_level", num_groups=8, top_groups=4, group_score="topk_sum"
    ),
}


@dataclass
class Traffic:
    """Rows per token one rank sends, and the share that leaves the rank."""

    rows_per_token: float
    off_rank_rows_per_token: float

    def gigabytes(self) -> float:
        """Per rank, per MoE layer and training step, at shape B."""
        per_row = SHAPE_B_DIM * BYTES_PER_VALUE * 4
        return SHAPE_B_TOKENS * self.off_rank_rows_per_token * per_row / 1e9


def traffic(topk_idx_TK: Tensor, num_experts: int, ep_size: int, dedup: bool) -> Traffic:
    """Rows for routing `topk_idx_TK` at EP=ep_size (token t lives on rank t mod P)."""
    T = topk_idx_TK.shape[0]
    dest_TK = topk_idx_TK // (num_experts // ep_size)
    if dedup:  # one row per distinct destination: keep the first of each repeated rank
        dest_TK = dest_TK.sort(-1).values
        fresh_TK = torch.ones_like(dest_TK, dtype=torch.bool)
        fresh_TK[:, 1:] = dest_TK[:, 1:] != dest_TK[:, :-1]
    else:
        fresh_TK = torch.ones_like(dest_TK, dtype=torch.bool)
    home_T = torch.arange(T, device=dest_TK.device) % ep_size
    off_TK = fresh_TK & (dest_TK != home_T[:, None])
    return Traffic(fresh_TK.sum().item() / T, off_TK.sum().item() / T)


def train_tiny(routing: dict, steps: int, device: torch.device, run_dir: Path):
    """The tiny model with 64 experts, top-8 and `routing`, trained `steps` steps."""
    from xpar.training.trainer import Trainer  # the trainer pulls in the data stack

    node = model_preset_node("tiny")
    shape_b = {"d_model": 64, "d_ff": 16, "num_experts": 64, "top_k": 8}
    moe = MoEConfig(**{**node["moe"], **shape_b, **routing})
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
    ep_size: int
    dedup: bool
    traffic: Traffic
    vs_flat: float = 1.0


def estimate(steps: int, device: torch.device) -> list[Row]:
    """Rows of the estimate table: each routing at each EP size, flat also with dedup."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, routing in ROUTINGS.items():
            trainer = train_tiny(routing, steps, device, Path(tmp) / name.split()[0])
            layers = routing_of(trainer)
            dedups = (False, True) if routing["router"] == "topk" else (True,)
            for ep in EP_SIZES:
                for dedup in dedups:
                    per_layer = [traffic(idx, 64, ep, dedup) for idx in layers]
                    mean = Traffic(
                        sum(t.rows_per_token for t in per_layer) / len(per_layer),
                        sum(t.off_rank_rows_per_token for t in per_layer) / len(per_layer),
                    )
                    rows.append(Row(name, ep, dedup, mean))
    for r in rows:
        flat = next(f for f in rows if f.ep_size == r.ep_size and not f.dedup)
        r.vs_flat = r.traffic.gigabytes() / flat.traffic.gigabytes()
    return rows


def print_estimate(rows: list[Row]) -> None:
    print(
        f"\nall-to-all estimate at shape B (T={SHAPE_B_TOKENS} per rank, D={SHAPE_B_DIM}, bf16, "
        f"E=64, k=8), from the routing of tiny models trained here; per rank, one MoE layer, "
        f"one training step (dispatch + combine, forward + backward)"
    )
    head = f"| {'routing':<29} | {'EP':>3} | dedup | rows/token | off-rank | {'GB/step':>8} |"
    print(head + " vs flat")
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|--------")
    for r in rows:
        t = r.traffic
        print(
            f"| {r.routing:<29} | {r.ep_size:>3} | {'yes' if r.dedup else 'no':<5} | "
            f"{t.rows_per_token:>10.2f} | {t.off_rank_rows_per_token:>8.2f} | "
            f"{t.gigabytes():>8.3f} | {r.vs_flat:.2f}"
        )
