"""parallelize(model, mesh, cfg): expert parallelism applied to a model written for one device.

Each rank keeps only its E / P experts of every MoE layer, the all-to-all dispatcher replaces
the local one, dense parameters are data-parallel over the whole world (DDP), and expert
gradients are reduced over their expert-data-parallel (EDP) group only.

Gradient scale: every rank's loss is the mean over its own tokens and the job's loss the mean of
those, so a gradient is a sum over ranks divided by the world size W. DDP averages dense
gradients over W. An expert's gradient on one rank already sums the contributions of the P
ranks of its EP group (the all-to-all's backward brings them home), so summing it over the EDP
group covers all W ranks, and it too is divided by W.
"""

from __future__ import annotations

import inspect
import math
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.parallel import DistributedDataParallel as DDP

from xpar.config import ParallelConfig
from xpar.model import MoETransformerLM
from xpar.model.trainable import apply_policy
from xpar.moe import GroupedExperts, MoELayer
from xpar.parallel.dispatcher import AllToAllDispatcher
from xpar.parallel.mesh import Layout, Mesh

# torch >= 2.13 renamed DDP's broadcast_buffers (and warns on the old name).
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DDP).parameters
    else {"broadcast_buffers": False}
)


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that live in expert banks (sharded under EP)."""
    return [
        f"{mod_name}.{p_name}"
        for mod_name, mod in model.named_modules()
        if isinstance(mod, GroupedExperts)
        for p_name, _ in mod.named_parameters(recurse=False)
    ]


def shard_experts(layer: MoELayer, layout: Layout) -> None:
    """Keep experts [ep_rank * X, (ep_rank + 1) * X) of the layer (X = E / P): a slice of the
    weights it has, or, for a model still on the meta device, a meta shard that init_weights()
    later fills by global expert id."""
    old = layer.experts
    X = old.num_experts // layout.ep_size
    lo = layout.ep_rank * X
    with torch.device("meta"):
        new = GroupedExperts(X, old.d_model, old.d_ff, old.impl, first_expert=lo)
    new = new.to(dtype=old.w1.dtype)
    if not old.w1.is_meta:
        new = new.to_empty(device=old.w1.device)
        with torch.no_grad():
            for name in ("w1", "w3", "w2"):
                getattr(new, name).copy_(getattr(old, name)[lo : lo + X])
    layer.experts = new


class ParallelModel:
    """A MoETransformerLM under the job's process layout. Call it like the model; after the
    last backward of an optimizer step call reduce_expert_grads(), then clip_grad_norm_().
    In a world of one every collective here is skipped. With `ddp=False` (DeepSpeed reduces
    the gradients) the module is called as it is."""

    def __init__(self, module: MoETransformerLM, mesh: Mesh, ddp: bool = True) -> None:
        self.module, self.mesh = module, mesh
        expert_names = set(expert_parameter_names(module))
        named = list(module.named_parameters())
        self.expert_params = [p for n, p in named if n in expert_names]
        self.dense_params = [p for n, p in named if n not in expert_names]
        self.ddp: DDP | None = None
        if ddp and mesh.layout.world > 1:
            DDP._set_params_and_buffers_to_ignore_for_model(module, sorted(expert_names))
            device_ids = [mesh.device] if mesh.device.type == "cuda" else None
            # Buffers stay per rank: balancing biases are kept equal by update_expert_bias, and
            # the load tallies must stay local until then (equal at start, so syncing them at
            # init is harmless).
            self.ddp = DDP(module, device_ids=device_ids, **_NO_BUFFER_SYNC)

    def __call__(self, *args, **kwargs):
        return (self.ddp or self.module)(*args, **kwargs)

    def no_sync(self, sync: bool):
        """Context for one micro-step's backward: DDP reduces only when `sync` (the last)."""
        return nullcontext() if sync or self.ddp is None else self.ddp.no_sync()

    def reduce_expert_grads(self) -> None:
        """Sum expert gradients over the EDP group and divide by the world size (see module
        docstring); one flat all-reduce."""
        layout = self.mesh.layout
        grads = [p.grad for p in self.expert_params if p.grad is not None]
        if layout.world == 1 or not grads:
            return
        flat = _flatten_dense_tensors(grads)
        if layout.edp_size > 1:
            dist.all_reduce(flat, group=self.mesh.edp_group)
        flat /= layout.world
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(reduced)

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip by the norm of the whole model's gradient (dense counted once, each expert once)
        and return that norm; max_norm=inf only measures it."""

        def sq(params: list[nn.Parameter]) -> Tensor:
            grads = [p.grad.float().square().sum() for p in params if p.grad is not None]
            return torch.stack(grads).sum() if grads else torch.zeros((), device=self.mesh.device)

        expert_sq = sq(self.expert_params)
        if self.mesh.layout.ep_size > 1:
            dist.all_reduce(expert_sq, group=self.mesh.ep_group)
        norm = (sq(self.dense_params) + expert_sq).sqrt()
        if math.isfinite(max_norm):
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            torch._foreach_mul_(grads, coef)
        return norm

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """Aux-loss-free balancing step in every layer that balances that way, from the load
        summed over all ranks (one all-reduce for all layers)."""
        layers = [m for m in self.module.moe_layers() if m.cfg.bias_update_rate > 0]
        for frozen in [m for m in layers if not m.router.gate.weight.requires_grad]:
            frozen.router.discard_load()  # a frozen router's balancing bias stays put too
        layers = [m for m in layers if m.router.gate.weight.requires_grad]
        if not layers:
            return
        load_LE = self.all_reduce_sum(torch.stack([m.router.pending_load for m in layers]))
        for layer, load_E in zip(layers, load_LE, strict=True):
            layer.router.update_bias(load_E)

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Sum over all ranks, as a new tensor (statistics, losses to report)."""
        t = t.clone()
        if self.mesh.layout.world > 1:
            dist.all_reduce(t)
        return t

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (small, JSON-able state such as a data position), in rank order."""
        if self.mesh.layout.world == 1:
            return [obj]
        out: list[Any] = [None] * self.mesh.layout.world
        dist.all_gather_object(out, obj)
        return out


def parallelize(
    model: MoETransformerLM, mesh: Mesh, cfg: ParallelConfig, ddp: bool = True, train: str = "all"
) -> ParallelModel:
    """Apply expert and data parallelism to `model` (see the module docstring). A model built
    on the meta device is materialised on the mesh's device and initialised afterwards
    (init_weights draws every expert's weights from its global id, so EP size changes
    nothing); a materialised one keeps its weights, each rank taking its experts' slice.
    `ddp=False` leaves gradient reduction to the caller (DeepSpeed). `train` is the
    finetune.train policy: what it does not train is frozen before DDP sees the parameters."""
    layout = mesh.layout
    for layer in model.moe_layers():
        dedup = layer.cfg.router == "two_level" if cfg.dedup is None else cfg.dedup
        if layout.world > 1:  # (ep_size divides the world: a world of one has no EP)
            shard_experts(layer, layout)
            layer.dispatcher = AllToAllDispatcher(
                layer.cfg,
                mesh.ep_group,
                layout.ep_size,
                dedup=dedup,
                stats_group=mesh.world_group if cfg.reduce_aux_stats else None,
            )
    if model.embed.weight.is_meta:
        model.to_empty(device=mesh.device)
        model.init_weights()
    apply_policy(model, train)
    return ParallelModel(model, mesh, ddp=ddp)
