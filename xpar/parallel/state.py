"""Global state dicts of an expert-parallel model: what a checkpoint holds, whatever the EP
size, so that a single process (or another EP size) can load it.

Expert banks ([E_local, ...] on each rank) are gathered along their first dim into the
[E, ...] bank of the single-device model, and sliced back on load; the same for the optimizer's
per-parameter tensors of those banks. Everything else is replicated. Saving gathers onto rank 0
alone, one tensor at a time, from the ranks of the first EP group (the other EP groups hold
copies of the same experts), and moves each to the CPU at once.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from xpar.parallel.parallelize import ParallelModel, expert_parameter_names


def _gather(t: Tensor, pm: ParallelModel) -> Tensor:
    """The global bank on rank 0 (on the CPU); an empty tensor elsewhere."""
    layout = pm.mesh.layout
    if layout.ep_size == 1 or layout.rank >= layout.ep_size:
        return t.detach().cpu() if layout.rank == 0 else t.new_empty(0)
    parts = [torch.empty_like(t) for _ in range(layout.ep_size)] if layout.rank == 0 else None
    dist.gather(t.contiguous(), parts, dst=0, group=pm.mesh.ep_group)
    return torch.cat(parts).cpu() if parts is not None else t.new_empty(0)


def expert_slice(t: Tensor, pm: ParallelModel) -> Tensor:
    """This rank's experts of a global [E, ...] bank (or of a tensor laid out like one)."""
    layout = pm.mesh.layout
    local = t.shape[0] // layout.ep_size
    return t[layout.ep_rank * local : (layout.ep_rank + 1) * local]


def full_model_state(pm: ParallelModel) -> dict[str, Tensor]:
    """The single-device model's state dict, complete on rank 0 (every rank must call it)."""
    experts = set(expert_parameter_names(pm.module))
    return {k: _gather(v, pm) if k in experts else v for k, v in pm.module.state_dict().items()}


def full_model_shapes(pm: ParallelModel) -> dict[str, tuple[int, ...]]:
    experts = set(expert_parameter_names(pm.module))
    P = pm.mesh.layout.ep_size
    return {
        k: (v.shape[0] * P, *v.shape[1:]) if k in experts else tuple(v.shape)
        for k, v in pm.module.state_dict().items()
    }


def load_full_model_state(pm: ParallelModel, state: dict[str, Tensor]) -> None:
    experts = set(expert_parameter_names(pm.module))
    local = {k: expert_slice(v, pm) if k in experts else v for k, v in state.items()}
    pm.module.load_state_dict(local, strict=True)


def _expert_indices(pm: ParallelModel, optimizer: torch.optim.Optimizer) -> set[int]:
    """Indices (in the optimizer's state-dict numbering) of expert-bank parameters."""
    experts = {id(p) for p in pm.expert_params}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return {i for i, p in enumerate(params) if id(p) in experts}


def _per_param(key: str, value: Any) -> bool:
    """A tensor laid out like its parameter (exp_avg, exp_avg_sq), not a scalar (step)."""
    return isinstance(value, Tensor) and value.ndim > 0 and key != "step"


def full_optimizer_state(pm: ParallelModel, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state dict as the single-device model would have it, complete on rank 0
    (every rank must call it)."""
    sd = optimizer.state_dict()
    for i in sorted(_expert_indices(pm, optimizer)):
        state = sd["state"].get(i, {})
        sd["state"][i] = {k: _gather(v, pm) if _per_param(k, v) else v for k, v in state.items()}
    return sd


def load_full_optimizer_state(
    pm: ParallelModel, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    experts = _expert_indices(pm, optimizer)
    local = {
        i: {
            k: expert_slice(v, pm) if i in experts and _per_param(k, v) else v for k, v in s.items()
        }
        for i, s in state["state"].items()
    }
    optimizer.load_state_dict({"state": local, "param_groups": state["param_groups"]})
