"""A step's statistics, summed over micro-batches and then over ranks in one all-reduce.

Legend: L MoE layers, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from xpar.model import LMOutput
from xpar.parallel.mesh import Mesh


@dataclass
class StepStats:
    """One step (or one evaluation) as Python numbers, the same on every rank."""

    loss: float  # LM cross-entropy, mean over the step's tokens
    aux_loss: float  # weighted aux + z losses summed over MoE layers
    dropped_fraction: float
    load_LE: np.ndarray  # fraction of routed slots per expert, per MoE layer
    a2a: dict[str, float]  # all-to-all totals, and min/mean/max over ranks (EP only)
    stop: bool  # some rank was asked to stop (a signal)
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0))  # a task's, summed


A2A_FIELDS = (
    "rows",
    "pair_rows",
    "bytes",
    "recv_slots",
    "inter_rows",
    "inter_bytes",
    "intra_rows",
    "intra_bytes",
)


class Tally:
    """Sums of LMOutputs; reduce() averages the losses over ranks (each rank's token count is
    the same), sums the counts (expert load, and `num_counts` task counts such as a confusion
    matrix), and gathers each rank's all-to-all figures."""

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        device: torch.device,
        rank: int = 0,
        world: int = 1,
        num_counts: int = 0,
    ) -> None:
        self.device, self.rank, self.world = device, rank, world
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # lm, aux, dropped
        self.counts_LE = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=device)
        self.a2a = [0] * len(A2A_FIELDS)  # host ints: known after the dispatch
        self.weight = 0.0
        self.counts = torch.zeros(num_counts, dtype=torch.float64, device=device)

    def add(self, out: LMOutput, weight: float = 1.0) -> None:
        """Count one forward pass at `weight` (e.g. 1 / micro-steps, or its token count)."""
        if weight:  # an empty evaluation share has NaN means: weight 0 must not count them
            self.sums[0] += out.loss.detach().double() * weight
            self.sums[1] += out.aux_loss.detach().double() * weight
            self.weight += weight
        if out.aux:
            if weight:
                dropped = torch.stack([a.dropped for a in out.aux]).double().mean()
                self.sums[2] += dropped * weight
            self.counts_LE += torch.stack([a.tokens_per_expert for a in out.aux]).double()
            for a in out.aux:
                if a.a2a is not None:
                    for i, name in enumerate(A2A_FIELDS):
                        self.a2a[i] += getattr(a.a2a, name)

    def reduce(
        self, mesh: Mesh, stop: bool = False, grad_norm: Tensor | None = None
    ) -> tuple[StepStats, float]:
        """The step's statistics summed over ranks (one all-reduce, in which each rank's
        all-to-all figures sit in its own slot: a gather) and read to the host in one copy,
        together with `grad_norm` (already global) when given."""
        F = len(A2A_FIELDS)
        a2a_WF = torch.zeros(self.world, F, dtype=torch.float64, device=self.device)
        a2a_WF[self.rank] = torch.tensor(self.a2a, dtype=torch.float64)
        extra = torch.tensor([self.weight, float(stop)], dtype=torch.float64, device=self.device)
        parts = [self.sums, extra, a2a_WF.flatten(), self.counts_LE.flatten(), self.counts]
        packed = mesh.all_reduce_sum(torch.cat(parts))
        norm = torch.zeros(1) if grad_norm is None else grad_norm.double().reshape(1)
        values = torch.cat([packed, norm.to(packed.device)]).cpu()
        sums, weight, stop_votes = values[:3], values[3], values[4]
        a2a_WF = values[5 : 5 + self.world * F].view(self.world, F)
        end_LE = 5 + self.world * F + self.counts_LE.numel()
        counts_LE = values[5 + self.world * F : end_LE].view(self.counts_LE.shape)
        load_LE = counts_LE / counts_LE.sum(-1, keepdim=True).clamp_min(1)
        mean = (sums / weight.clamp_min(1e-12)).tolist()
        stats = StepStats(
            loss=mean[0],
            aux_loss=mean[1],
            dropped_fraction=mean[2],
            load_LE=load_LE.numpy(),
            a2a=_a2a_metrics(a2a_WF) if a2a_WF[:, 1].sum() else {},
            stop=bool(stop_votes > 0),
            counts=values[end_LE:-1].numpy(),
        )
        return stats, float(values[-1])


def _a2a_metrics(a2a_WF: Tensor) -> dict[str, Any]:
    """Totals over ranks, and per rank (min/mean/max): rows and bytes each rank sent, split by
    link class (to other nodes, to other ranks of its node), and the expert slots its experts
    computed (the straggler that sets an EP step's pace)."""
    col = dict(zip(A2A_FIELDS, a2a_WF.T, strict=True))
    total = {name: int(c.sum()) for name, c in col.items()}
    out: dict[str, Any] = {
        "a2a_rows": total["rows"],
        "a2a_pair_rows": total["pair_rows"],
        "a2a_bytes": total["bytes"],
        "a2a_saving": 1.0 - total["rows"] / total["pair_rows"],
    }
    for link in ("inter", "intra"):
        out[f"a2a_{link}_rows"] = total[f"{link}_rows"]
        out[f"a2a_{link}_bytes"] = total[f"{link}_bytes"]
    per_rank = {
        "a2a_rows": "rows",
        "a2a_bytes": "bytes",
        "a2a_inter_bytes": "inter_bytes",
        "a2a_intra_bytes": "intra_bytes",
        "expert_slots": "recv_slots",
    }
    for name, field_name in per_rank.items():
        c = col[field_name]
        stats = {"min": c.min(), "mean": c.mean(), "max": c.max()}
        out.update({f"rank_{name}_{k}": float(v) for k, v in stats.items()})
    return out
