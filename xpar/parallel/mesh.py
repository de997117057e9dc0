"""Process layout: expert-parallel (EP) groups of `ep_size` consecutive ranks, expert-data-
parallel (EDP) groups of the ranks that hold the same experts, and dense data parallelism over
the whole world. Every rank reads its own shard of the data.

Legend: W world size, P ep_size. Rank r is EP rank r % P of EP group r // P; the EDP group of
r is {r' : r' % P == r % P} (W / P ranks). "EP=2 x DP=2" is W=4, P=2.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from xpar.checks import UserError
from xpar.moe import MoEConfig
from xpar.parallel.config import ParallelConfig


@dataclass(frozen=True)
class Layout:
    """Where this rank sits; derived from the world size and ep_size alone."""

    world: int
    rank: int
    ep_size: int

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def edp_size(self) -> int:
        return self.world // self.ep_size


def world_from_env() -> tuple[int, int, int]:
    """(world size, rank, local rank) as torchrun sets them; (1, 0, 0) without torchrun."""
    env = os.environ
    return int(env.get("WORLD_SIZE", 1)), int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0))


def ranks_per_node(parallel: ParallelConfig, world: int) -> int:
    """parallel.ranks_per_node, else torchrun's LOCAL_WORLD_SIZE, else the whole world."""
    if parallel.ranks_per_node is not None:
        return parallel.ranks_per_node
    return int(os.environ.get("LOCAL_WORLD_SIZE", world))


def spans_nodes(parallel: ParallelConfig, world: int) -> bool:
    """Whether each EP group spans several whole nodes (its consecutive ranks start a node)."""
    P, L = parallel.ep_size, ranks_per_node(parallel, world)
    return P > L and P % L == 0


def hierarchical_a2a(parallel: ParallelConfig, world: int) -> bool:
    """Whether the EP all-to-all runs in two hops (xpar.parallel.dispatcher): parallel.a2a, or
    by default whenever an EP group spans whole nodes."""
    if parallel.a2a is None:
        return spans_nodes(parallel, world)
    return parallel.a2a == "hierarchical"


def check_layout(parallel: ParallelConfig, moe: MoEConfig | None, world: int) -> None:
    """Raise UserError unless the layout fits the world and the MoE layer. It looks only at the
    config, the world size and torchrun's node size, so every rank reaches the same verdict
    before any collective."""
    P, S = parallel.ep_size, parallel.shard_size
    L = ranks_per_node(parallel, world)
    if world % L:
        raise UserError(
            f"parallel.ranks_per_node={L} does not divide the world size {world}: nodes hold "
            f"equal numbers of consecutive ranks; set it to the processes a node runs"
        )
    if S is not None and world % S:
        raise UserError(
            f"parallel.shard_size={S} does not divide the world size {world}: dense parameters "
            f"are sharded over groups of shard_size ranks and replicated across the groups; "
            f"use a divisor of {world}, or null to shard over all ranks"
        )
    if world % P:
        launch = " (launch with torchrun --nproc_per_node N)" if world == 1 else ""
        raise UserError(
            f"parallel.ep_size={P} does not divide the world size {world}{launch}; use an "
            f"ep_size that divides the number of processes"
        )
    if parallel.a2a == "hierarchical" and not spans_nodes(parallel, world):
        raise UserError(
            f"parallel.a2a=hierarchical needs each EP group to span whole nodes, but "
            f"parallel.ep_size={P} is not a multiple of ranks_per_node={L} above it; use "
            f"parallel.a2a=flat"
        )
    if P == 1:
        return
    if moe is None:
        raise UserError(f"parallel.ep_size={P} needs MoE layers, but moe=dense has none")
    if moe.num_experts % P:
        raise UserError(
            f"moe.num_experts={moe.num_experts} is not divisible by parallel.ep_size={P}"
        )
    if moe.router == "two_level" and moe.num_groups % P and P % moe.num_groups:
        raise UserError(
            f"moe.num_groups={moe.num_groups} does not map onto parallel.ep_size={P} ranks: "
            f"each rank must hold whole groups (num_groups divisible by ep_size) or each group "
            f"whole ranks (ep_size divisible by num_groups)"
        )
    if moe.pad_to_capacity:
        raise UserError(
            f"moe.pad_to_capacity=True is single-process only; parallel.ep_size={P} moves "
            f"only the kept slots"
        )


@dataclass(frozen=True)
class EPNodes:
    """Where the ranks of this rank's EP group sit: `node_of` gives each EP rank's node (nodes
    hold `per_node` consecutive ranks), and for the hierarchical all-to-all `inter` joins this
    rank's peers of its local index (one a node) and `intra` the group's ranks on its node."""

    node_of: tuple[int, ...]  # node of each EP rank, ep_size entries
    per_node: int
    inter: ProcessGroup | None = None
    intra: ProcessGroup | None = None

    @property
    def hierarchical(self) -> bool:
        return self.inter is not None


def ep_nodes(layout: Layout, per_node: int, hierarchical: bool) -> EPNodes:
    """This rank's EPNodes. With `hierarchical` (each EP group spans whole nodes) it creates
    the groups of both hops, a collective: every rank calls it, with the same arguments."""
    P, L = layout.ep_size, per_node
    base = layout.rank - layout.ep_rank
    node_of = tuple((base + p) // L for p in range(P))
    if not hierarchical:
        return EPNodes(node_of, L)
    starts = range(0, layout.world, P)
    G = P // L
    inter, _ = dist.new_subgroups_by_enumeration(
        [[g + n * L + i for n in range(G)] for g in starts for i in range(L)]
    )
    intra, _ = dist.new_subgroups_by_enumeration(
        [[g + n * L + i for i in range(L)] for g in starts for n in range(G)]
    )
    return EPNodes(node_of, L, inter, intra)


@dataclass
class Mesh:
    """The process groups of one job (all None in a world of one), and the few collectives
    outside the MoE layer: statistics, small state and barriers. In a world of one every
    collective here is skipped."""

    layout: Layout
    device: torch.device
    device_mesh: DeviceMesh | None = None
    ep_nodes: EPNodes | None = None  # where the EP group's ranks sit (None: a world of one)

    @classmethod
    def solo(cls, device: torch.device | str = "cpu") -> Mesh:
        """One process (a tool such as `python -m xpar.export`, or a single-process run)."""
        return cls(Layout(1, 0, 1), torch.device(device))

    @property
    def distributed(self) -> bool:
        """Whether the job's default process group joins several processes."""
        return self.layout.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Sum over all ranks, as a new tensor (statistics, losses to report)."""
        t = t.clone()
        if self.distributed:
            dist.all_reduce(t)
        return t

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (small, JSON-able state such as a data position), in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.layout.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @property
    def world_group(self) -> ProcessGroup | None:
        return dist.group.WORLD if self.device_mesh is not None else None

    @property
    def ep_group(self) -> ProcessGroup | None:
        return None if self.device_mesh is None else self.device_mesh.get_group("ep")

    @property
    def edp_group(self) -> ProcessGroup | None:
        return None if self.device_mesh is None else self.device_mesh.get_group("edp")


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def join_process_group(device: torch.device, timeout_s: int) -> None:
    """Join the job's default process group: the one torchrun's environment names, nccl on
    GPUs and gloo on the CPU, or, in a single process, a group of one in memory (for libraries
    that want one, such as DeepSpeed). A no-op when already joined. The only place xpar
    initialises a process group."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    if world_from_env()[0] > 1:
        dist.init_process_group(backend_for(device), timeout=timeout)
        return
    dist.init_process_group(
        backend_for(device), store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
    )
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)  # DeepSpeed reads them


def init_mesh(parallel: ParallelConfig, moe: MoEConfig | None, device: torch.device) -> Mesh:
    """Check the layout, then (in a world of more than one) join the process group, build the
    (edp, ep) device mesh on `device` (this rank's GPU, or the CPU) and place the EP ranks on
    nodes (with the hierarchical all-to-all's groups where it applies)."""
    world, rank, _ = world_from_env()
    check_layout(parallel, moe, world)
    layout = Layout(world, rank, parallel.ep_size)
    if world == 1:
        return Mesh(layout, device)
    join_process_group(device, parallel.timeout_s)
    shape = (world // parallel.ep_size, parallel.ep_size)
    device_mesh = init_device_mesh(device.type, shape, mesh_dim_names=("edp", "ep"))
    nodes = ep_nodes(layout, ranks_per_node(parallel, world), hierarchical_a2a(parallel, world))
    return Mesh(layout, device, device_mesh, nodes)
