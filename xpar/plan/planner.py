"""A job's plan on a cluster: memory per GPU against the GPU's, and the step time, for the
layout its config names or (search) for every layout of ep_size x recompute x ZeRO stage x
micro-batch the trainer would take.

Memory: the model state (xpar.plan.state, exact), one micro-batch's activations
(xpar.plan.activations; gradient accumulation holds one at a time), the all-to-all's send and
receive buffers of one layer, and the gradient buffers of the backend: DDP's buckets (a copy
of the dense gradients) and the expert gradients flattened for their reduce under
`deepspeed=none`; DeepSpeed's reduce bucket and the fp32 copy of the gradient partition its
step makes under ZeRO, and under ZeRO-1 with gradient accumulation the whole gradients it keeps
between micro-steps (ZeRO-2 reduces each micro-step's into its partition). A job fits when
that peak, plus RESERVE_GIB for the CUDA context and the cuBLAS/NCCL workspaces, is within
the GPU's memory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from xpar.checks import UserError
from xpar.config import TrainConfig
from xpar.model import RECOMPUTE_MODES
from xpar.parallel.mesh import check_layout
from xpar.plan.activations import ActivationBytes, activation_bytes
from xpar.plan.gpus import GPU
from xpar.plan.state import FP32, ParamInventory, StateBytes, inventory, state_bytes
from xpar.plan.timing import Efficiency, Job, StepTime, step_time
from xpar.plan.traffic import RowsPerToken, rows_per_token

GIB = 2**30
RESERVE_GIB = 3.0
STAGES = (0, 1, 2)


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
    stage: int
    micro_batch: int
    accumulation: int
    state: StateBytes
    activations: ActivationBytes
    buffers: dict[str, int]
    time: StepTime
    memory_bytes: float  # the GPU's

    @property
    def peak_bytes(self) -> int:
        return self.state.total + self.activations.total + sum(self.buffers.values())

    @property
    def fits(self) -> bool:
        return self.peak_bytes + RESERVE_GIB * GIB <= self.memory_bytes

    @property
    def overrides(self) -> str:
        """The command-line settings of this layout."""
        zero = "none" if self.stage == 0 else f"zero{self.stage}"
        return (
            f"parallel.ep_size={self.ep_size} trainer.recompute={self.recompute} "
            f"deepspeed={zero} data.micro_batch_size={self.micro_batch}"
        )


def train_bytes(cfg: TrainConfig) -> int:
    """Bytes of a parameter under ZeRO: the training dtype's (on a GPU, auto is bf16)."""
    return FP32 if cfg.trainer.precision == "fp32" else 2


def plan_job(cfg: TrainConfig, cluster: Cluster, inv: ParamInventory | None = None) -> Plan:
    """The plan of `cfg`'s own layout on `cluster`; the trainer's own errors for a layout it
    would refuse."""
    W = cluster.gpus
    check_layout(cfg.parallel, cfg.moe, W)
    micro, accum = cfg.data.accumulation(dp_world=W)
    inv = inv or inventory(cfg)
    model, tc, P = cfg.model_config(), cfg.trainer, cfg.parallel.ep_size
    stage, nbytes = cfg.deepspeed.stage, train_bytes(cfg)
    precision = "fp32" if tc.precision == "fp32" else "bf16"
    act_bytes = 4 if precision == "fp32" else 2
    dedup = model.moe is not None and cfg.parallel.dedup_for(model.moe.router)
    state = state_bytes(inv, stage, nbytes, W, P)
    acts = activation_bytes(
        model, micro, cfg.data.seq_len, tc.recompute, tc.recompute_layers, precision, P, dedup,
        all_to_all=W > 1 and model.moe is not None,  # parallelize() uses it on any world > 1
        bf16_weights=stage > 0 and nbytes == 2,
    )  # fmt: skip
    rows = rows_per_token(model.moe, P, dedup, cluster.gpus_per_node) if model.moe else None
    tokens_micro = micro * cfg.data.seq_len
    buffers = {"all_to_all": 0, "gradients": 0}
    if rows is not None and P > 1:  # one layer's rows out and in, dispatch or combine
        buffers["all_to_all"] = int(2 * tokens_micro * rows.rows * model.d_model * act_bytes)
    dense_trained, expert_trained = sum(inv.dense_groups), inv.expert_trained // P
    if stage == 0:
        buffers["gradients"] = FP32 * ((dense_trained if W > 1 else 0) + expert_trained)
    else:
        bucket = min(cfg.deepspeed.reduce_bucket_size, dense_trained + expert_trained)
        buffers["gradients"] = nbytes * bucket + state.masters.total  # fp32 grads = masters'
        if stage == 1 and accum > 1:  # ZeRO-1 accumulates whole gradients between micro-steps
            buffers["gradients"] += nbytes * (dense_trained + expert_trained)
    optimizer_elements = (
        dense_trained + expert_trained if stage == 0 else state.masters.total // FP32
    )
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
    )
    time = step_time(
        model, job, inv, rows or RowsPerToken(0.0, 0.0, 0.0), optimizer_elements, cluster.gpu,
        cluster.efficiency,
    )  # fmt: skip
    return Plan(
        P, tc.recompute, stage, micro, accum, state, acts, buffers, time,
        cluster.gpu.memory_gib * GIB,
    )  # fmt: skip


def with_layout(cfg: TrainConfig, ep: int, recompute: str, stage: int, micro: int) -> TrainConfig:
    """`cfg` at another layout (each section checked again)."""
    return dataclasses.replace(
        cfg,
        parallel=dataclasses.replace(cfg.parallel, ep_size=ep),
        trainer=dataclasses.replace(cfg.trainer, recompute=recompute),
        deepspeed=dataclasses.replace(cfg.deepspeed, stage=stage),
        data=dataclasses.replace(cfg.data, micro_batch_size=micro),
    )


def search(cfg: TrainConfig, cluster: Cluster) -> list[Plan]:
    """Every layout the trainer would take on `cluster`: fitting ones first, fastest first (the
    smaller peak first among equals: the time model gives a micro-batch size no speed of its
    own); then the rest, smallest peak memory first."""
    W, moe = cluster.gpus, cfg.moe
    per_rank = cfg.data.batch_size // W if cfg.data.batch_size % W == 0 else 0
    if not per_rank:
        cfg.data.accumulation(dp_world=W)  # the trainer's own error
    eps = [p for p in range(1, W + 1) if W % p == 0 and (moe is None or moe.num_experts % p == 0)]
    micros = [m for m in range(1, per_rank + 1) if per_rank % m == 0]
    recomputes = RECOMPUTE_MODES if moe is not None else ("none", "full")
    inv = inventory(cfg)
    plans = []
    for ep in eps if moe is not None else [1]:
        for recompute in recomputes:
            for stage in STAGES:
                for micro in micros:
                    try:
                        job = with_layout(cfg, ep, recompute, stage, micro)
                        plans.append(plan_job(job, cluster, inv))
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
