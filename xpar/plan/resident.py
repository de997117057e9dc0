"""What a live Trainer's model state occupies on this rank: the ground truth `xpar.plan.state`
is checked against, read from the tensors themselves (storages counted once). Under FSDP the
parameters, their gradients and AdamW's moments are DTensors: their local shards are read,
whose storages hold the padding too."""

from __future__ import annotations

from typing import Any

import torch

from xpar.plan.state import Split, StateBytes
from xpar.training.plain import local_shard


def _bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def _split(pairs: list[tuple[bool, torch.Tensor]]) -> Split:
    """Bytes of unique storages, charged dense or expert by the first tensor seen on each."""
    seen: dict[int, tuple[bool, int]] = {}
    for expert, t in pairs:
        seen.setdefault(t.untyped_storage().data_ptr(), (expert, _bytes(t)))
    return Split(sum(n for e, n in seen.values() if not e), sum(n for e, n in seen.values() if e))


def resident_state(trainer: Any) -> StateBytes:
    """This rank's weights, gradients, AdamW state and fp32 masters. Call it after an optimizer
    step (AdamW's state exists) and a backward pass (gradients exist, for deepspeed=none)."""
    experts = {id(p) for p in trainer.pm.expert_params}
    params = list(trainer.model.parameters())
    weights = _split([(id(p) in experts, local_shard(p)) for p in params])
    if trainer.backend.name in ("plain", "fsdp"):  # fsdp: its sharded fp32 weights are masters
        state = trainer.backend.optimizer.state
        moments = [
            (id(p) in experts, local_shard(t)) for p in params for t in state.get(p, {}).values()
        ]
        grads = [(id(p) in experts, local_shard(p.grad)) for p in params if p.grad is not None]
        return StateBytes(weights, _split(grads), _split(moments), Split())
    zero = trainer.backend.zero
    grads, moments, masters = [], [], []
    for i, group in enumerate(zero.optimizer.param_groups):
        expert = bool(group.get("moe"))
        flat = zero.single_partition_of_fp32_groups[i]
        grad_bytes = int(zero.partition_size[i]) * zero.bit16_groups_flat[i].element_size()
        grads.append((expert, grad_bytes))
        masters.append((expert, flat))
        moments += [(expert, t) for t in zero.optimizer.state.get(flat, {}).values()]

    def total(pairs: list[tuple[bool, int]], want: bool) -> int:
        return sum(n for e, n in pairs if e == want)

    return StateBytes(
        weights,
        Split(total(grads, False), total(grads, True)),
        _split(moments),
        _split(masters),
        groups={
            ("expert" if g.get("moe") else f"dense{i}"): zero.bit16_groups_flat[i].numel()
            for i, g in enumerate(zero.optimizer.param_groups)
        },
    )
