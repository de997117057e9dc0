"""A job's plan on a cluster: memory per GPU against the GPU's, and the step time, for the
layout its config names or (search) for every layout of ep_size x recompute x backend x
micro-batch the trainer would take (backends: deepspeed=none|zero1|zero2, and
parallel.shard=fsdp over all ranks or, HSDP, over each node; with parallel.offload too when
nothing else fits). The all-to-all is the trainer's: parallel.a2a, or by default hierarchical
where an EP group spans whole nodes (nodes of the cluster's gpus_per_node ranks).

Memory: the model state (xpar.plan.state, exact), one micro-batch's activations
(xpar.plan.activations; gradient accumulation holds one at a time), the all-to-all's send and
receive buffers of one layer (hierarchical: the second hop's, and the first hop's rows it
forwards), and the gradient buffers of the backend: DDP's buckets (a copy
of the dense gradients) and the expert gradients flattened for their reduce under
`deepspeed=none`; DeepSpeed's reduce bucket and the fp32 copy of the gradient partition its
step makes under ZeRO, and under ZeRO-1 with gradient accumulation the whole gradients it keeps
between micro-steps (ZeRO-2 reduces each micro-step's into its partition).

Under `parallel.shard=fsdp` (xpar.training.fsdp) the buffers are the gathered units, in the
compute dtype, at the larger of two moments. During a layer's backward: the root (gathered
from its forward to the end of backward) and its gradients, the layer's block and expert units,
one more unit being prefetched, and the largest unit's gradients with their fp32
reduce-scatter input; at the root's own reduce: the root, its gradients and their fp32 copy.
Units count padded, as FSDP gathers them. With gradient accumulation FSDP keeps every unit's
whole gradients in fp32 between micro-steps, unless `parallel.reduce_micro_steps` reduces each
micro-step's into the shards. Under `parallel.offload` the model state lives in
host memory (`Plan.host_bytes`) and the GPU holds only those buffers and the activations (the
1 / ranks shards in transit are left out).

A job fits when the peak, plus RESERVE_GIB for the CUDA context and the cuBLAS/NCCL
workspaces, is within the GPU's memory, and the host holds what it must: the model in fp32 as
parallelize() initialises it there at start-up (dense whole, this rank's experts), and under
offload the model state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from itertools import product

from xpar.checks import UserError
from xpar.config import TrainConfig
from xpar.model import RECOMPUTE_MODES
from xpar.parallel import ParallelConfig
from xpar.parallel.mesh import check_layout, hierarchical_a2a
from xpar.plan.activations import ActivationBytes, activation_bytes
from xpar.plan.gpus import GPU
from xpar.plan.state import (
    FP32,
    ParamInventory,
    StateBytes,
    chunk,
    fsdp_state_bytes,
    gathered,
    inventory,
    sharding,
    state_bytes,
)
from xpar.plan.timing import Efficiency, Job, StepTime, step_time
from xpar.plan.traffic import NO_ROWS, RowsPerToken, rows_per_token

GIB = 2**30
RESERVE_GIB = 3.0
STAGES = (0, 1, 2)


@dataclass(frozen=True)
class Backend:
    """A training backend as the config selects it: a ZeRO stage (0: none), or fsdp."""

    stage: int = 0
    shard: str = "none"
    shard_size: int | None = None
    offload: bool = False
    reduce_micro_steps: bool = False

    @property
    def name(self) -> str:
        """Short: plain, zero1, zero2, fsdp; fsdp:S for HSDP over S ranks; +offload; +reduce
        for a reduce-scatter every micro-step."""
        if self.shard != "fsdp":
            return f"zero{self.stage}" if self.stage else "plain"
        size = f":{self.shard_size}" if self.shard_size else ""
        offload = "+offload" if self.offload else ""
        return f"fsdp{size}{offload}{'+reduce' if self.reduce_micro_steps else ''}"

    @property
    def overrides(self) -> str:
        if self.shard != "fsdp":
            return f"deepspeed={f'zero{self.stage}' if self.stage else 'none'}"
        size = f" parallel.shard_size={self.shard_size}" if self.shard_size else ""
        offload = " parallel.offload=true" if self.offload else ""
        reduce = " parallel.reduce_micro_steps=true" if self.reduce_micro_steps else ""
        return f"deepspeed=none parallel.shard=fsdp{size}{offload}{reduce}"


def backend_of(cfg: TrainConfig) -> Backend:
    par = cfg.parallel
    return Backend(
        cfg.deepspeed.stage, par.shard, par.shard_size, par.offload, par.reduce_micro_steps
    )


@dataclass(frozen=True)
class Cluster:
    gpus: int
    gpus_per_node: int
    gpu: GPU
    efficiency: Efficiency = field(default_factory=Efficiency)


@dataclass(frozen=True)
class Plan:
    """One layout's figures per GPU."""

    ep_size: int
    recompute: str
    backend: Backend
    micro_batch: int
    accumulation: int
    state: StateBytes
    activations: ActivationBytes
    buffers: dict[str, int]
    time: StepTime
    memory_bytes: float  # the GPU's
    host_memory_bytes: float  # the GPU's share of its node's
    # The model as parallelize() builds it in host memory before any backend takes it: fp32,
    # dense whole and this rank's experts.
    startup_host_bytes: int = 0
    a2a: str = "flat"  # the all-to-all this layout runs: flat or hierarchical
    a2a_setting: str | None = None  # parallel.a2a as the config gives it (None: auto)

    @property
    def stage(self) -> int:
        return self.backend.stage

    @property
    def peak_bytes(self) -> int:
        state = 0 if self.backend.offload else self.state.total
        return state + self.activations.total + sum(self.buffers.values())

    @property
    def host_bytes(self) -> int:
        """Model state in host memory, per GPU (parallel.offload)."""
        return self.state.total if self.backend.offload else 0

    @property
    def fits_gpu(self) -> bool:
        return self.peak_bytes + RESERVE_GIB * GIB <= self.memory_bytes

    @property
    def fits_host(self) -> bool:
        return max(self.host_bytes, self.startup_host_bytes) <= self.host_memory_bytes

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host

    @property
    def overrides(self) -> str:
        """The command-line settings of this layout."""
        a2a = f" parallel.a2a={self.a2a_setting}" if self.a2a_setting else ""
        return (
            f"parallel.ep_size={self.ep_size}{a2a} trainer.recompute={self.recompute} "
            f"{self.backend.overrides} data.micro_batch_size={self.micro_batch}"
        )


def train_bytes(cfg: TrainConfig) -> int:
    """Bytes of a parameter under ZeRO, or gathered under fsdp: the training dtype's (on a
    GPU, auto is bf16)."""
    return FP32 if cfg.trainer.precision == "fp32" else 2


def fsdp_buffers(
    inv: ParamInventory,
    world: int,
    ep_size: int,
    shard_size: int | None,
    nbytes: int,
    accum: int,
    reduce_micro_steps: bool = False,
) -> dict[str, int]:
    """FSDP's gathered units and gradient buffers at their peak (see the module docstring), in
    bytes; `nbytes`: the compute dtype's."""
    shardings = [sharding(u, world, ep_size, shard_size) for u in inv.units]
    params = [gathered(u, sh) for u, sh in zip(inv.units, shardings, strict=True)]
    grads = [gathered(u, sh, trained=True) for u, sh in zip(inv.units, shardings, strict=True)]
    layers, experts = [], 0  # a block is gathered while its experts (the units before it) run
    for unit, n in zip(inv.units[:-1], params[:-1], strict=True):
        if unit.expert:
            experts += n
        else:
            layers.append(n + experts)
            experts = 0
    *units, root = range(len(inv.units))
    big_params, big_grads = max(params[u] for u in units), max(grads[u] for u in units)
    in_layer = {
        "unsharded_params": nbytes * (params[root] + max(layers) + big_params),
        "gradients": nbytes * (grads[root] + big_grads) + FP32 * big_grads,
    }
    at_root = {
        "unsharded_params": nbytes * params[root],
        "gradients": (nbytes + FP32) * grads[root],
    }
    out = max(in_layer, at_root, key=lambda d: sum(d.values()))
    if accum > 1 and not reduce_micro_steps:  # every unit's whole fp32 gradients, kept
        for unit, sh in zip(inv.units, shardings, strict=True):
            whole = sum(s.rows // sh.rows_divisor * s.row for s in unit.params if s.trained)
            out["gradients"] += FP32 * whole
    return out


def fsdp_optimizer_elements(
    inv: ParamInventory, world: int, ep_size: int, shard_size: int | None
) -> int:
    """The trained elements rank 0's AdamW steps: a whole chunk of every trained tensor."""
    total = 0
    for unit in inv.units:
        sh = sharding(unit, world, ep_size, shard_size)
        for s in unit.params:
            total += chunk(s.rows // sh.rows_divisor, sh.ranks) * s.row if s.trained else 0
    return total


def on_nodes(parallel: ParallelConfig, cluster: Cluster) -> ParallelConfig:
    """`parallel` with the cluster's node size, which the planner's timing assumes."""
    L, given = cluster.gpus_per_node, parallel.ranks_per_node
    if given is not None and given != L:
        raise UserError(
            f"parallel.ranks_per_node={given} is not the planner's {L} GPUs a node; plan with "
            f"--gpus-per-node {given}, or drop parallel.ranks_per_node"
        )
    return dataclasses.replace(parallel, ranks_per_node=L)


def a2a_buffer_rows(rows: RowsPerToken) -> float:
    """Rows a token has in all-to-all buffers at once: a hop's out and in, and the rows the hop
    before it received (the input it gathers from)."""
    held = [2 * r + (rows.hops[i - 1] if i else 0.0) for i, r in enumerate(rows.hops)]
    return max(held)


def plan_job(cfg: TrainConfig, cluster: Cluster, inv: ParamInventory | None = None) -> Plan:
    """The plan of `cfg`'s own layout on `cluster`; the trainer's own errors for a layout it
    would refuse."""
    W = cluster.gpus
    parallel = on_nodes(cfg.parallel, cluster)
    check_layout(parallel, cfg.moe, W)
    a2a = "hierarchical" if hierarchical_a2a(parallel, W) else "flat"
    micro, accum = cfg.data.accumulation(dp_world=W)
    inv = inv or inventory(cfg)
    model, tc, P = cfg.model_config(), cfg.trainer, cfg.parallel.ep_size
    backend, nbytes = backend_of(cfg), train_bytes(cfg)
    stage, fsdp, S = backend.stage, backend.shard == "fsdp", backend.shard_size
    precision = "fp32" if tc.precision == "fp32" else "bf16"
    act_bytes = 4 if precision == "fp32" else 2
    dedup = model.moe is not None and cfg.parallel.dedup_for(model.moe.router)
    state = fsdp_state_bytes(inv, W, P, S) if fsdp else state_bytes(inv, stage, nbytes, W, P)
    acts = activation_bytes(
        model, micro, cfg.data.seq_len, tc.recompute, tc.recompute_layers, precision, P, dedup,
        all_to_all=W > 1 and model.moe is not None,  # parallelize() uses it on any world > 1
        bf16_weights=(stage > 0 or fsdp) and nbytes == 2,  # DeepSpeed's bf16, FSDP's gathers
    )  # fmt: skip
    rows = NO_ROWS
    if model.moe is not None:
        rows = rows_per_token(model.moe, P, dedup, cluster.gpus_per_node, a2a == "hierarchical")
    tokens_micro = micro * cfg.data.seq_len
    buffers = {"all_to_all": 0, "gradients": 0}
    if P > 1:  # one layer's rows in flight, dispatch or combine
        held = a2a_buffer_rows(rows)
        buffers["all_to_all"] = int(tokens_micro * held * model.d_model * act_bytes)
    dense_trained, expert_trained = sum(inv.dense_groups), inv.expert_trained // P
    if fsdp:
        buffers.update(fsdp_buffers(inv, W, P, S, nbytes, accum, backend.reduce_micro_steps))
        optimizer_elements = fsdp_optimizer_elements(inv, W, P, S)
    elif stage == 0:
        buffers["gradients"] = FP32 * ((dense_trained if W > 1 else 0) + expert_trained)
        optimizer_elements = dense_trained + expert_trained
    else:
        bucket = min(cfg.deepspeed.reduce_bucket_size, dense_trained + expert_trained)
        buffers["gradients"] = nbytes * bucket + state.masters.total  # fp32 grads = masters'
        if stage == 1 and accum > 1:  # ZeRO-1 accumulates whole gradients between micro-steps
            buffers["gradients"] += nbytes * (dense_trained + expert_trained)
        optimizer_elements = state.masters.total // FP32
    job = Job(
        seq_len=cfg.data.seq_len,
        tokens=cfg.data.batch_size * cfg.data.seq_len // W,
        world=W,
        gpus_per_node=cluster.gpus_per_node,
        ep_size=P,
        recompute=tc.recompute,
        recompute_layers=tc.recompute_layers,
        stage=stage,
        train_bytes=nbytes,
        act_bytes=act_bytes,
        shard=backend.shard,
        shard_size=S,
        offload=backend.offload,
        reduce_micro_steps=backend.reduce_micro_steps,
        accumulation=accum,
        a2a=a2a,
    )
    time = step_time(model, job, inv, rows, optimizer_elements, cluster.gpu, cluster.efficiency)
    return Plan(
        P, tc.recompute, backend, micro, accum, state, acts, buffers, time,
        cluster.gpu.memory_gib * GIB, cluster.gpu.host_memory_gib * GIB,
        FP32 * (inv.total - (inv.expert_trained + inv.frozen_expert) * (P - 1) // P),
        a2a, cfg.parallel.a2a,
    )  # fmt: skip


def with_layout(
    cfg: TrainConfig, ep: int, recompute: str, backend: Backend, micro: int
) -> TrainConfig:
    """`cfg` at another layout (each section checked again)."""
    return dataclasses.replace(
        cfg,
        parallel=dataclasses.replace(
            cfg.parallel,
            ep_size=ep,
            shard=backend.shard,
            shard_size=backend.shard_size,
            offload=backend.offload,
            reduce_micro_steps=backend.reduce_micro_steps,
        ),
        trainer=dataclasses.replace(cfg.trainer, recompute=recompute),
        deepspeed=dataclasses.replace(cfg.deepspeed, stage=backend.stage),
        data=dataclasses.replace(cfg.data, micro_batch_size=micro),
    )


def backends(cluster: Cluster, offload: bool) -> list[Backend]:
    """The backends the search tries: every ZeRO stage, and fsdp over all ranks or (HSDP) over
    each node, keeping whole gradients between micro-steps or reducing each; with `offload`,
    only fsdp's offloading ones."""
    W, node = cluster.gpus, cluster.gpus_per_node
    sizes = [None] + ([node] if node < W and W % node == 0 else [])
    fsdp = [Backend(0, "fsdp", size, offload, each) for size in sizes for each in (False, True)]
    return fsdp if offload else [Backend(stage) for stage in STAGES] + fsdp


def search(cfg: TrainConfig, cluster: Cluster) -> list[Plan]:
    """Every layout the trainer would take on `cluster`: fitting ones first, fastest first (the
    smaller peak first among equals: the time model gives a micro-batch size no speed of its
    own); then the rest, smallest peak memory first. The offloading layouts (slow: AdamW on the
    host, the shards over PCIe) are tried only when no other fits."""
    W, moe = cluster.gpus, cfg.moe
    per_rank = cfg.data.batch_size // W if cfg.data.batch_size % W == 0 else 0
    if not per_rank:
        cfg.data.accumulation(dp_world=W)  # the trainer's own error
    eps = [p for p in range(1, W + 1) if W % p == 0 and (moe is None or moe.num_experts % p == 0)]
    eps = eps if moe is not None else [1]
    micros = [m for m in range(1, per_rank + 1) if per_rank % m == 0]
    recomputes = RECOMPUTE_MODES if moe is not None else ("none", "full")
    inv = inventory(cfg)
    plans: list[Plan] = []
    for offload in (False, True):
        if any(p.fits for p in plans):
            break
        for layout in product(eps, recomputes, backends(cluster, offload), micros):
            if layout[2].reduce_micro_steps and layout[3] == per_rank:
                continue  # no accumulation: the same as keeping whole gradients
            try:
                plans.append(plan_job(with_layout(cfg, *layout), cluster, inv))
            except UserError:
                continue  # a layout the trainer refuses (two-level groups, say)
    fitting = sorted((p for p in plans if p.fits), key=lambda p: (p.time.total, p.peak_bytes))
    rest = sorted((p for p in plans if not p.fits), key=lambda p: p.peak_bytes)
    return fitting + rest


def gpus_needed(cfg: TrainConfig, cluster: Cluster, limit: int = 1 << 16) -> int | None:
    """The fewest GPUs (powers of two times a node, at the job's batch per GPU) on which some
    layout fits; None if none up to `limit`."""
    per_gpu = max(cfg.data.batch_size // cluster.gpus, 1)
    gpus = cluster.gpus * 2
    while gpus <= limit:
        bigger = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, batch_size=per_gpu * gpus, micro_batch_size=None))  # fmt: skip
        wider = dataclasses.replace(cluster, gpus=gpus)
        if any(p.fits for p in search(bigger, wider)[:1]):
            return gpus
        gpus *= 2
    return None
