"""The FSDP2 backend (`parallel.shard=fsdp`): PyTorch's `fully_shard` over xpar's expert
parallelism, the parameter sharding (ZeRO-3) that DeepSpeed refuses for expert-parallel layers.

Units, as torchtitan lays them out: each layer's expert bank (this EP rank's E / P experts) is
one unit sharded over its expert-data-parallel group; each block's dense parameters (attention,
norms, router, shared experts) one unit, and the embedding, final norm and head the root's,
sharded over groups of `parallel.shard_size` consecutive ranks (all of them by default) and,
when those groups are fewer than the world, replicated across them (HSDP). Every parameter,
its gradient and its AdamW state are sharded on dim 0 (FSDP pads the last rank's piece); a unit
is all-gathered for its forward and backward and freed after each.

Gradient scale, as xpar's own backend has it (xpar.training.plain): a dense gradient is
averaged over all W ranks (FSDP's reduce-scatter within a shard group and all-reduce across
them). An expert gradient already sums its EP group's P ranks (the all-to-all's backward brings
them home), so FSDP's average over the W / P EDP ranks is divided by P once more.

Mixed precision: under bf16 the units are all-gathered and computed in bf16 (FSDP's param
dtype) while the sharded parameters stay fp32, the master weights, and gradients are reduced
in fp32. `parallel.offload` keeps the shards, their gradients and AdamW's state in CPU memory
(FSDP's CPUOffloadPolicy) and steps the optimizer there.

Gradient accumulation: the micro-steps before the last keep every unit's whole gradients and
do not communicate, and the last one reduce-scatters the sum; `parallel.reduce_micro_steps`
reduce-scatters each micro-step's into the sharded gradients instead (1 / ranks of the memory,
a reduce-scatter per micro-step).

Checkpoints hold each rank's shard of every tensor under the keys every backend uses
(xpar.persist.fragments): a dim-0 shard is a contiguous range of the flattened tensor, so a run
saved here resumes under any backend and layout, and the other way round.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor

from xpar.config import TrainConfig
from xpar.moe import GroupedExperts
from xpar.parallel.mesh import join_process_group
from xpar.parallel.parallelize import ParallelModel, expert_parameter_names
from xpar.persist.fragments import MODEL
from xpar.persist.sharded import Fragment
from xpar.training.optim import build_optimizer
from xpar.training.plain import TorchAdamWBackend

log = logging.getLogger(__name__)


def dense_mesh(device_type: str, world: int, shard_size: int | None) -> DeviceMesh:
    """The dense units' mesh: one dim of all ranks, or (replicate, shard) for HSDP."""
    S = shard_size or world
    if world == S:
        return init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))
    return init_device_mesh(device_type, (world // S, S), mesh_dim_names=("replicate", "shard"))


def shard_rows(rows: int, ranks: int, index: int) -> tuple[int, int]:
    """(first row, rows) that shard `index` of `ranks` holds of `rows`: FSDP cuts dim 0 into
    chunks of ceil(rows / ranks), as torch.chunk does (the last shorter, or empty)."""
    chunk = -(-rows // ranks)
    first = min(index * chunk, rows)
    return first, min(chunk, rows - first)


def shard_range(t: DTensor) -> tuple[int, int]:
    """(first row, rows) of the global tensor that this rank's dim-0 shard of `t` holds."""
    (dim,) = [i for i, p in enumerate(t.placements) if p.is_shard()]
    return shard_rows(t.shape[0], t.device_mesh.size(dim), t.device_mesh.get_local_rank(dim))


class FsdpBackend(TorchAdamWBackend):
    """See the module docstring. A world of one works too (CPU offload on one GPU)."""

    name = "fsdp"

    def __init__(self, pm: ParallelModel, cfg: TrainConfig) -> None:
        self.pm, self.max_norm = pm, cfg.optim.grad_clip or math.inf
        mesh, module, layout = pm.mesh, pm.module, pm.mesh.layout
        par = cfg.parallel
        self.reduce_micro_steps = par.reduce_micro_steps
        join_process_group(mesh.device, par.timeout_s)  # one process: a group of one
        device_type = mesh.device.type
        self.dense_mesh = dense_mesh(device_type, layout.world, par.shard_size)
        self.expert_mesh = (
            mesh.device_mesh["edp"]
            if mesh.device_mesh is not None
            else init_device_mesh(device_type, (1,), mesh_dim_names=("edp",))
        )
        self.replicas = layout.world // (par.shard_size or layout.world)
        precision = cfg.trainer.precision_on(device_type)
        compute = {"bf16": torch.bfloat16}.get(precision)
        policy: dict[str, Any] = {
            "mp_policy": MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32),
            "offload_policy": CPUOffloadPolicy(pin_memory=device_type == "cuda")
            if par.offload
            else OffloadPolicy(),
        }
        self._expert_names = set(expert_parameter_names(module))
        for block in module.layers:
            for m in block.modules():
                if isinstance(m, GroupedExperts):
                    fully_shard(m, mesh=self.expert_mesh, **policy)
                    # A rank whose experts got no token still joins the reduce-scatter.
                    m.set_reduce_scatter_unused_params(True, recurse=False)
            fully_shard(block, mesh=self.dense_mesh, **policy)
        fully_shard(module, mesh=self.dense_mesh, **policy)
        pm.rebind_params()
        # Offloaded, AdamW steps the host's shards: torch's multi-tensor kernels (foreach), which
        # it takes by default only on CUDA.
        self.optimizer = build_optimizer(
            module,
            cfg.optim,
            torch.device("cpu") if par.offload else mesh.device,
            cfg.finetune.head_lr,
            foreach=True if par.offload else None,
        )
        log.info(
            "FSDP2: dense parameters sharded over %d ranks%s, experts over groups of %d (EDP %d)%s",
            layout.world // self.replicas,
            f" x {self.replicas} replicas" if self.replicas > 1 else "",
            layout.ep_size,
            layout.edp_size,
            ", offloaded to the CPU" if par.offload else "",
        )

    @contextmanager
    def micro_step(self, last: bool) -> Iterator[Any]:
        # Accumulating micro-steps keep whole gradients and the last one reduce-scatters them,
        # unless parallel.reduce_micro_steps reduces each into the shards.
        self.pm.module.set_requires_gradient_sync(last or self.reduce_micro_steps)
        yield self.pm.module

    @torch.no_grad()
    def clip_grad_norm(self) -> Tensor:
        """Scale the expert gradients (see the module docstring), then clip by the norm of the
        whole model's gradient: every rank's shards' squares summed over the world, the dense
        ones counted once per replica."""
        pm, P = self.pm, self.pm.mesh.layout.ep_size
        dense, expert = _local_grads(pm.dense_params), _local_grads(pm.expert_params)
        if P > 1 and expert:
            torch._foreach_mul_(expert, 1.0 / P)

        def sq(grads: list[Tensor]) -> Tensor:
            if not grads:
                return torch.zeros((), device=pm.mesh.device)
            return torch.stack([g.float().square().sum() for g in grads]).sum().to(pm.mesh.device)

        sums = torch.stack([sq(dense), sq(expert)])
        if pm.mesh.distributed:
            dist.all_reduce(sums)
        norm = (sums[0] / self.replicas + sums[1]).sqrt()
        if math.isfinite(self.max_norm):
            coef = (self.max_norm / (norm + 1e-6)).clamp(max=1.0)
            for grads in (dense, expert):
                if grads:
                    torch._foreach_mul_(grads, coef.to(grads[0].device))
        return norm

    # ---- state -------------------------------------------------------------------------------

    def _fragment(self, name: str, t: Tensor) -> Fragment | None:
        """This rank's piece of the single-device model's tensor `name` (None: an empty shard);
        `t` is the module's (a DTensor shard, or a whole buffer)."""
        if not isinstance(t, DTensor):
            return Fragment.whole(t)
        first, rows = shard_range(t)
        if rows == 0:
            return None
        numel, layout = t.numel(), self.pm.mesh.layout
        base, total = 0, numel
        if name in self._expert_names:  # this EP rank's experts, within the global bank
            base, total = layout.ep_rank * numel, numel * layout.ep_size
        row = numel // t.shape[0]
        return Fragment(t.to_local().view(-1), base + first * row, total)

    def model_state(self) -> dict[str, Fragment]:
        out = {}
        for name, t in self.pm.module.state_dict().items():
            if (fragment := self._fragment(name, t)) is not None:
                out[MODEL + name] = fragment
        return out


def _local_grads(params: list[nn.Parameter]) -> list[Tensor]:
    """This rank's shards of the gradients there are."""
    return [p.grad.to_local() for p in params if p.grad is not None]
