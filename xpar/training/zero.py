"""The DeepSpeed ZeRO-1/2 backend over xpar's expert parallelism.

DeepSpeed treats a parameter as an expert only if it carries its MoE markers (`allreduce=False`
and the `group_name` of an expert group), sits in an optimizer group flagged `moe`, and the
model holds an instance of DeepSpeed's own MoE layer, whose `set_deepspeed_parallelism()`
creates the expert groups. Unmarked experts are taken for dense ones: broadcast from rank 0 at
start-up and averaged over the whole world. `ExpertGroups` is that instance: it carries only
`num_experts` and `ep_size` (xpar's router, dispatcher and experts do the work) and creates
DeepSpeed's groups, which must be xpar's (EP groups of consecutive ranks, EDP groups strided).

With the markers, ZeRO reduces and partitions dense gradients and optimizer state over all
ranks and expert ones over their expert-data-parallel group, dividing both by the world size,
as xpar's own backend does (see xpar.training.plain).

Checkpoints hold each rank's pieces of the fp32 master weights and AdamW moments, read from the
ZeRO partitions where DeepSpeed keeps them (each trained parameter's fragment in this rank's
flat partition), under the same keys as every backend: xpar's format, not DeepSpeed's, so that
nothing is unpickled and any layout resumes from any other.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import Tensor, nn

from xpar.config import TrainConfig
from xpar.model.trainable import head_names
from xpar.parallel.mesh import join_process_group
from xpar.parallel.parallelize import ParallelModel, expert_parameter_names
from xpar.persist.fragments import MODEL, MOMENTS, module_fragments, optim_key
from xpar.persist.sharded import Fragment
from xpar.training.backend import Read, StepOutcome
from xpar.training.optim import adamw_state, group_params

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
        # DeepSpeed saves and loads one file per local expert of its own layer; xpar saves
        # the expert banks itself (xpar.training.zero.ZeroBackend.state).
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


def deepspeed_config(
    cfg: TrainConfig, micro: int, accum: int, world: int, device_type: str = "cpu"
) -> dict[str, Any]:
    """The DeepSpeed config for a job on `device_type`: batch sizes, precision (trainer.precision
    with auto resolved as the trainer resolves it), clipping, ZeRO and AdamW.

    The learning-rate schedule stays xpar's (warmup then cosine/linear/constant, stepped by the
    trainer on every step): DeepSpeed's WarmupCosineLR warms up differently by a step, and
    runs must match across deepspeed=none|zero1|zero2.
    """
    ds, optim = cfg.deepspeed, cfg.optim
    precision = cfg.trainer.precision_on(device_type)
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
    """The DeepSpeed engine around `pm.module` (already sharded by parallelize()).
    Returns the engine; its module is `pm.module`, its optimizer the ZeRO optimizer."""
    module, layout = pm.module, pm.mesh.layout
    moe = cfg.model_config().moe
    join_process_group(pm.mesh.device, cfg.parallel.timeout_s)  # one process: a group of one
    # A dense model (moe=dense), or one whose experts are frozen (finetune.train=head|
    # router+head), is plain ZeRO data parallelism: DeepSpeed's MoE mode wants an expert group
    # to partition, and frozen experts have no gradient to reduce.
    moe = moe if any(p.requires_grad for p in pm.expert_params) else None
    if moe is not None:
        mark_experts(module, layout.ep_size)
        module.add_module("ds_expert_groups", ExpertGroups(moe.num_experts, layout.ep_size))
    # DeepSpeed broadcasts every parameter it does not take for an expert from rank 0 when it
    # starts: unmarked (frozen) experts would all become rank 0's. Put each rank's own back.
    own_banks = [p.detach().clone() for p in pm.expert_params] if moe is None else []
    config = deepspeed_config(cfg, micro, accum, layout.world, pm.mesh.device.type)
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
    with torch.no_grad():
        for p, bank in zip(pm.expert_params, own_banks, strict=False):
            p.copy_(bank)
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


def loss_scaler_state(scaler: Any) -> dict[str, Any]:
    """What DeepSpeed's (dynamic) loss scaler needs to go on: its scale and counters."""
    keys = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
    return {k: getattr(scaler, k) for k in keys if hasattr(scaler, k)}


class ZeroBackend:
    """DeepSpeed's engine as a training backend (see xpar.training.backend)."""

    name = "deepspeed"

    def __init__(self, pm: ParallelModel, cfg: TrainConfig, micro: int, accum: int) -> None:
        self.pm = pm
        self.engine = initialize(pm, cfg, micro, accum)
        self.optimizer = self.engine.basic_optimizer
        self.zero = self.engine.optimizer
        self.fp16 = cfg.trainer.precision == "fp16"
        self._last = True

    @contextmanager
    def micro_step(self, last: bool) -> Iterator[Any]:
        self._last = last
        yield self.engine

    def backward(self, loss: Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        if not self._last:
            self.engine.step()  # DeepSpeed counts micro-steps; it steps at the last

    def clip_grad_norm(self) -> Tensor:
        """DeepSpeed's step at the accumulation boundary: it reduces the gradients, clips and
        steps, or skips a step whose gradients are not finite on some rank."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return torch.tensor(math.nan if norm is None else float(norm))

    def step(self, loss_finite: bool, finite: bool) -> StepOutcome:
        """What DeepSpeed's step did: it skips a step by its gradients (checked on every rank,
        a non-finite loss makes them non-finite too), so `finite` is its verdict already."""
        applied = bool(self.engine.was_step_applied())
        if not applied and self.fp16 and loss_finite:
            scale = self.zero.loss_scale
            return StepOutcome(False, f"fp16 loss scale overflow (scale now {scale:g})")
        return StepOutcome(applied)

    # ---- state -------------------------------------------------------------------------------

    def _fragments(self) -> Iterator[tuple[int, str, Any]]:
        """(flat group, parameter name, DeepSpeed's fragment map) of every trained parameter
        with a piece in this rank's partition."""
        names = {id(p): n for n, p in self.pm.module.named_parameters()}
        for g, params in enumerate(self.zero.bit16_groups):
            for lp in params:
                if lp._hp_mapping is not None:
                    yield g, names[id(lp)], lp._hp_mapping

    def _group_state(self, g: int) -> dict[str, Tensor]:
        """AdamW's state of flat group `g` (created as its first step would if it has none)."""
        flat = self.zero.single_partition_of_fp32_groups[g]
        return adamw_state(self.zero.optimizer, flat, self.zero.optimizer.param_groups[g])

    def _masters(self, module: dict[str, Fragment]) -> dict[str, Fragment]:
        """`model/<name>`: this rank's fragments of the fp32 master weights."""
        out = {}
        for _, name, m in self._fragments():
            base = module[MODEL + name]  # where this rank's copy sits in the global tensor
            start = base.offset + m.lp_fragment_address.start
            out[MODEL + name] = Fragment(m.hp_fragment.view(-1), start, base.numel)
        return out

    def _optimizer_state(
        self, module: dict[str, Fragment]
    ) -> tuple[dict[str, Fragment], dict[int, Tensor]]:
        """This rank's fragments of the AdamW moments, and each parameter's step count: a copy
        of its flat group's (saved files hold no two keys on one memory), which `_set_steps`
        puts back after a load."""
        out, steps = {}, {}
        for g, name, m in self._fragments():
            state, base = self._group_state(g), module[MODEL + name]
            start = base.offset + m.lp_fragment_address.start
            address = m.hp_fragment_address
            for kind in MOMENTS:
                piece = state[kind].narrow(0, address.start, address.numel)
                out[optim_key(kind, name)] = Fragment(piece, start, base.numel)
            steps[g] = step = state["step"].detach().clone().view(1)
            out[optim_key("step", name)] = Fragment.whole(step)
        return out, steps

    def _set_steps(self, steps: dict[int, Tensor]) -> None:
        for g, step in steps.items():
            self._group_state(g)["step"].copy_(step.view(()))

    def model_state(self) -> dict[str, Fragment]:
        return self._model_state(module_fragments(self.pm.module, self.pm.mesh.layout))

    def _model_state(self, module: dict[str, Fragment]) -> dict[str, Fragment]:
        trained = {MODEL + n for n, p in self.pm.module.named_parameters() if p.requires_grad}
        kept = {k: v for k, v in module.items() if k not in trained}  # frozen, and buffers
        return {**kept, **self._masters(module)}

    def state(self) -> dict[str, Fragment]:
        module = module_fragments(self.pm.module, self.pm.mesh.layout)
        return {**self._model_state(module), **self._optimizer_state(module)[0]}

    def extra_state(self) -> dict[str, Any]:
        return {"loss_scaler": loss_scaler_state(self.zero.loss_scaler)}

    def load(self, read: Read, extra: dict[str, Any]) -> None:
        """The module's own (bit16, whole) weights first, then this rank's fragments of the
        fp32 masters and moments."""
        module = module_fragments(self.pm.module, self.pm.mesh.layout)
        read(module)
        optimizer, steps = self._optimizer_state(module)
        read({**self._masters(module), **optimizer})
        self._set_steps(steps)
        for key, value in (extra.get("loss_scaler") or {}).items():
            setattr(self.zero.loss_scaler, key, value)
