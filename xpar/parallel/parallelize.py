"""parallelize(model, mesh, cfg): expert parallelism applied to a model written for one device.

Each rank keeps only its E / P experts of every MoE layer and the all-to-all dispatcher replaces
the local one; dense parameters stay whole on every rank. How gradients meet across ranks is up
to the training backend (xpar.training.backend): DDP plus an expert-data-parallel reduce, or
DeepSpeed ZeRO.
"""

from __future__ import annotations

import torch
from torch import nn

from xpar.model import MoETransformerLM
from xpar.model.trainable import apply_policy
from xpar.moe import GroupedExperts, MoELayer
from xpar.parallel.config import ParallelConfig
from xpar.parallel.dispatcher import AllToAllDispatcher
from xpar.parallel.mesh import Layout, Mesh


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
    """A MoETransformerLM under the job's process layout: the module (this rank's experts), the
    mesh, which parameters are expert banks, and the aux-loss-free bias step, whose load is
    summed over all ranks. How gradients are reduced is the training backend's business."""

    def __init__(self, module: MoETransformerLM, mesh: Mesh) -> None:
        self.module, self.mesh = module, mesh
        self.rebind_params()

    def rebind_params(self) -> None:
        """(Re)list the expert and dense parameters: a backend that replaces the module's
        parameters (FSDP2 makes them DTensors) calls it afterwards."""
        expert_names = set(expert_parameter_names(self.module))
        named = list(self.module.named_parameters())
        self.expert_params = [p for n, p in named if n in expert_names]
        self.dense_params = [p for n, p in named if n not in expert_names]

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
        load_LE = self.mesh.all_reduce_sum(torch.stack([m.router.pending_load for m in layers]))
        for layer, load_E in zip(layers, load_LE, strict=True):
            layer.router.update_bias(load_E)


def parallelize(
    model: MoETransformerLM, mesh: Mesh, cfg: ParallelConfig, train: str = "all"
) -> ParallelModel:
    """Apply expert and data parallelism to `model` (see the module docstring). A model built
    on the meta device is materialised and initialised on the host, so that every device and
    EP size draws the same weights (init_weights draws every expert's from its global id), and
    then moved to the mesh's device; under parallel.shard=fsdp it stays on the host, and FSDP
    moves each unit to the device as it shards it, so the device never holds the whole model.
    A materialised model keeps its weights, each rank taking its experts' slice.
    `train` is the finetune.train policy: what it does not train is frozen before a training
    backend sees the parameters."""
    layout = mesh.layout
    for layer in model.moe_layers():
        dedup = cfg.dedup_for(layer.cfg.router)
        if layout.world > 1:  # (ep_size divides the world: a world of one has no EP)
            shard_experts(layer, layout)
            layer.dispatcher = AllToAllDispatcher(
                layer.cfg,
                mesh.ep_group,
                layout.ep_size,
                dedup=dedup,
                stats_group=mesh.world_group if cfg.reduce_aux_stats else None,
                nodes=mesh.ep_nodes,
            )
    if model.embed.weight.is_meta:
        model.to_empty(device="cpu")
        model.init_weights()
        if cfg.shard != "fsdp":
            model.to(mesh.device)
    apply_policy(model, train)
    return ParallelModel(model, mesh)
