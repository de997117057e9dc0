"""DeepSpeed ZeRO-1/2 over xpar's expert parallelism.

DeepSpeed treats a parameter as an expert only if it carries its MoE markers (`allreduce=False`
and the `group_name` of an expert group), sits in an optimizer group flagged `moe`, and the
model holds an instance of DeepSpeed's own MoE layer, whose `set_deepspeed_parallelism()`
creates the expert groups. Unmarked experts are taken for dense ones: broadcast from rank 0 at
start-up and averaged over the whole world. `ExpertGroups` is that instance: it carries only
`num_experts` and `ep_size` (xpar's router, dispatcher and experts do the work) and creates
DeepSpeed's groups, which must be xpar's (EP groups of consecutive ranks, EDP groups strided).

With the markers, ZeRO reduces and partitions dense gradients and optimizer state over all
ranks and expert ones over their expert-data-parallel group, dividing both by the world size,
as xpar's own loop does (see xpar.parallel.parallelize).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import nn

from xpar.config import TrainConfig
from xpar.model.trainable import head_names
from xpar.parallel.parallelize import ParallelModel, expert_parameter_names
from xpar.training.optim import group_params

log = logging.getLogger(__name__)


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert groups of one EP size."""
    return f"ep_size_{ep_size}"


class ExpertGroups(MoE):
    """A stand-in for DeepSpeed's MoE layer with no gate and no experts: its presence turns on
    DeepSpeed's MoE handling, and it creates the expert groups (see the module docstring)."""

    def __init__(self, num_experts: int, ep_size: int) -> None:
        nn.Module.__init__(self)  # not MoE.__init__: no DeepSpeed gate or experts
        self.num_experts, self.ep_size = num_experts, ep_size
        # DeepSpeed saves and loads one file per local expert of its own layer; xpar's expert
        # banks travel in the ZeRO partitions and xpar's per-EP-rank files instead.
        self.num_local_experts = 0
        self.expert_group_name = expert_group_name(ep_size)
        self.enable_expert_tensor_parallelism = False

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(
                self.ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel_
            )

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("ExpertGroups only marks the model for DeepSpeed; it has no forward")


def deepspeed_config(cfg: TrainConfig, micro: int, accum: int, world: int) -> dict[str, Any]:
    """The DeepSpeed config for a job: batch sizes, precision, clipping, ZeRO and AdamW.

    The learning-rate schedule stays xpar's (warmup then cosine/linear/constant, stepped by the
    trainer on every step): DeepSpeed's WarmupCosineLR warms up differently by a step, and
    runs must match across deepspeed=none|zero1|zero2.
    """
    ds, optim = cfg.deepspeed, cfg.optim
    precision = cfg.trainer.precision
    config: dict[str, Any] = {
        "train_batch_size": micro * accum * world,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": optim.grad_clip or 0.0,
        "zero_optimization": {
            "stage": ds.stage,
            "overlap_comm": ds.overlap_comm,
            "contiguous_gradients": ds.contiguous_gradients,
            "reduce_bucket_size": ds.reduce_bucket_size,
            "allgather_bucket_size": ds.allgather_bucket_size,
            "reduce_scatter": True,
        },
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": [optim.beta1, optim.beta2],
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
                # torch's AdamW (fused on CUDA unless optim.fused says otherwise), the same
                # update as deepspeed=none; DeepSpeed's FusedAdam needs a CUDA build step.
                "torch_adam": True,
            },
        },
        "steps_per_print": 1 << 30,  # xpar logs
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {
            "enabled": True,
            "loss_scale": 0,  # dynamic
            "initial_scale_power": ds.initial_scale_power,
            "loss_scale_window": ds.loss_scale_window,
            "hysteresis": ds.hysteresis,
            "min_loss_scale": ds.min_loss_scale,
        }
    return config


def optimizer_groups(
    module: nn.Module, weight_decay: float, ep_size: int, head_lr: float | None = None
) -> list[dict]:
    """xpar.training.optim's groups over the dense trainable parameters (the head's at
    `head_lr` when given), and a group of their own for the expert banks (which decay),
    flagged `moe`: ZeRO partitions it over the expert-data-parallel group."""
    experts = set(expert_parameter_names(module))
    named = {n: p for n, p in module.named_parameters() if p.requires_grad}
    dense = {n: p for n, p in named.items() if n not in experts}
    groups_ = group_params(dense, head_names(module), weight_decay, head_lr)
    groups_.append(
        {
            "name": expert_group_name(ep_size),
            "moe": True,
            "params": [named[n] for n in named if n in experts],
            "weight_decay": weight_decay,
        }
    )
    return [g for g in groups_ if g["params"]]


def mark_experts(module: nn.Module, ep_size: int) -> None:
    """Set DeepSpeed's expert markers on every expert bank."""
    params = dict(module.named_parameters())
    for name in expert_parameter_names(module):
        params[name].allreduce = False
        params[name].group_name = expert_group_name(ep_size)


def _check_groups(pm: ParallelModel) -> None:
    """DeepSpeed's expert groups must be xpar's, or gradients would meet the wrong ranks."""
    layout, name = pm.mesh.layout, expert_group_name(pm.mesh.layout.ep_size)
    want_ep = [layout.rank // layout.ep_size * layout.ep_size + i for i in range(layout.ep_size)]
    want_edp = list(range(layout.ep_rank, layout.world, layout.ep_size))
    got_ep = dist.get_process_group_ranks(groups._get_expert_parallel_group(name))
    got_edp = dist.get_process_group_ranks(groups._get_expert_data_parallel_group(name))
    if sorted(got_ep) != want_ep or sorted(got_edp) != want_edp:
        raise RuntimeError(
            f"DeepSpeed built expert groups EP {got_ep} / EDP {got_edp} on rank {layout.rank}; "
            f"xpar's layout needs EP {want_ep} / EDP {want_edp}"
        )


def initialize(pm: ParallelModel, cfg: TrainConfig, micro: int, accum: int):
    """The DeepSpeed engine around `pm.module` (already sharded by parallelize(ddp=False)).
    Returns the engine; its module is `pm.module`, its optimizer the ZeRO optimizer."""
    module, layout = pm.module, pm.mesh.layout
    moe = cfg.model_config().moe
    if not dist.is_initialized():  # one process: DeepSpeed still wants a process group
        backend = "nccl" if pm.mesh.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        for key in ("RANK", "LOCAL_RANK"):  # DeepSpeed reads them
            os.environ.setdefault(key, "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    # A dense model (moe=dense), or one whose experts are frozen (finetune.train=head|
    # router+head), is plain ZeRO data parallelism: DeepSpeed's MoE mode wants an expert group
    # to partition, and frozen experts have no gradient to reduce.
    moe = moe if any(p.requires_grad for p in pm.expert_params) else None
    if moe is not None:
        mark_experts(module, layout.ep_size)
        module.add_module("ds_expert_groups", ExpertGroups(moe.num_experts, layout.ep_size))
    config = deepspeed_config(cfg, micro, accum, layout.world)
    fused = pm.mesh.device.type == "cuda" if cfg.optim.fused is None else cfg.optim.fused
    if fused:
        config["optimizer"]["params"]["fused"] = True
    engine, *_ = deepspeed.initialize(
        model=module,
        model_parameters=optimizer_groups(
            module, cfg.optim.weight_decay, layout.ep_size, cfg.finetune.head_lr
        ),
        config=config,
        dist_init_required=False,
    )
    if moe is not None:
        _check_groups(pm)
    # Skip a step whose gradients are not finite in every precision (DeepSpeed checks only
    # under fp16, or bf16 when asked); one all-reduce of a flag per step.
    engine.optimizer.check_grad_overflow = True
    _restore_fp32_buffers(module)
    log.info(
        "DeepSpeed ZeRO-%d: %d ranks, experts over groups of %d (EDP %d)",
        cfg.deepspeed.stage,
        layout.world,
        layout.ep_size,
        layout.edp_size,
    )
    return engine


def _restore_fp32_buffers(module: nn.Module) -> None:
    """DeepSpeed's bf16/fp16 casts the whole module, buffers included; balancing biases and
    load tallies (counts) stay fp32 so that they add up exactly."""
    for m in module.modules():
        for name, buf in m.named_buffers(recurse=False):
            if buf.is_floating_point() and buf.dtype != torch.float32:
                setattr(m, name, buf.float())


def local_optimizer_bytes(engine) -> dict[str, int]:
    """Bytes of optimizer state (moments and fp32 master partitions) this rank holds, split
    into dense and expert groups."""
    zero = engine.optimizer
    out = {"dense": 0, "expert": 0}
    for i, group in enumerate(zero.optimizer.param_groups):
        kind = "expert" if group.get("moe") else "dense"
        flat = zero.single_partition_of_fp32_groups[i]
        state = zero.optimizer.state.get(flat, {})
        tensors = [t for t in state.values() if torch.is_tensor(t) and t.ndim > 0]
        out[kind] += sum(t.numel() * t.element_size() for t in [flat, *tensors])
    return out
