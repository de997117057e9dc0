"""xpar's own backend: DDP over the dense parameters, expert gradients reduced over their
expert-data-parallel (EDP) group, torch's AdamW with state replicated like the parameters.

Gradient scale: every rank's loss is the mean over its own tokens and the job's loss the mean of
those, so a gradient is a sum over ranks divided by the world size W. DDP averages dense
gradients over W. An expert's gradient on one rank already sums the contributions of the P
ranks of its EP group (the all-to-all's backward brings them home), so summing it over the EDP
group covers all W ranks, and it too is divided by W.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from xpar.config import OptimConfig
from xpar.parallel.parallelize import ParallelModel
from xpar.persist.fragments import MODEL, MOMENTS, like, module_fragments, optim_key
from xpar.persist.sharded import Fragment
from xpar.training.backend import Read, StepOutcome
from xpar.training.optim import adamw_state, build_optimizer

# torch >= 2.13 renamed DDP's broadcast_buffers (and warns on the old name).
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DDP).parameters
    else {"broadcast_buffers": False}
)


def local_shard(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (an FSDP parameter, gradient or moment), or `t` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


class TorchAdamWBackend:
    """What xpar's own backend and FSDP2's (xpar.training.fsdp) share: torch's AdamW over the
    module's own parameters (whole tensors, or DTensor shards), a step the loop's verdict
    skips, and checkpoints of this rank's fragments of the model (`model_state`) with AdamW's
    state laid out like them."""

    pm: ParallelModel
    optimizer: torch.optim.AdamW

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self, loss_finite: bool, finite: bool) -> StepOutcome:
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(applied=finite)

    def model_state(self) -> dict[str, Fragment]:
        raise NotImplementedError

    def _optimizer_state(self, model: dict[str, Fragment]) -> dict[str, Fragment]:
        """`optim/*` of every trained parameter with a fragment in `model` (an FSDP rank past a
        tensor's rows has none): the moments like that fragment, and the step."""
        group_of = {id(q): g for g in self.optimizer.param_groups for q in g["params"]}
        out = {}
        for name, p in self.pm.module.named_parameters():
            if not p.requires_grad or MODEL + name not in model:
                continue
            state = adamw_state(self.optimizer, p, group_of[id(p)])
            for kind in MOMENTS:
                out[optim_key(kind, name)] = like(model[MODEL + name], local_shard(state[kind]))
            out[optim_key("step", name)] = Fragment.whole(state["step"].view(1))
        return out

    def state(self) -> dict[str, Fragment]:
        model = self.model_state()
        return {**model, **self._optimizer_state(model)}

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load(self, read: Read, extra: dict[str, Any]) -> None:
        model = self.model_state()
        read(model)
        read(self._optimizer_state(model))


class PlainBackend(TorchAdamWBackend):
    """See the module docstring. In a world of one every collective is skipped."""

    name = "plain"

    def __init__(self, pm: ParallelModel, cfg: OptimConfig, head_lr: float | None) -> None:
        self.pm, self.max_norm = pm, cfg.grad_clip or math.inf
        mesh, module = pm.mesh, pm.module
        self.ddp: DDP | None = None
        if mesh.distributed:
            experts = {id(p) for p in pm.expert_params}
            ignore = sorted(n for n, p in module.named_parameters() if id(p) in experts)
            DDP._set_params_and_buffers_to_ignore_for_model(module, ignore)
            device_ids = [mesh.device] if mesh.device.type == "cuda" else None
            # Buffers stay per rank: balancing biases are kept equal by update_expert_bias, and
            # the load tallies must stay local until then (equal at start, so syncing them at
            # init is harmless).
            self.ddp = DDP(module, device_ids=device_ids, **_NO_BUFFER_SYNC)
        self.optimizer = build_optimizer(module, cfg, mesh.device, head_lr)

    @contextmanager
    def micro_step(self, last: bool) -> Iterator[Any]:
        with nullcontext() if last or self.ddp is None else self.ddp.no_sync():
            yield self.ddp or self.pm.module

    def clip_grad_norm(self) -> Tensor:
        self._reduce_expert_grads()
        return self._clip()

    def _reduce_expert_grads(self) -> None:
        """Sum expert gradients over the EDP group and divide by the world size (see module
        docstring); one flat all-reduce."""
        layout = self.pm.mesh.layout
        grads = [p.grad for p in self.pm.expert_params if p.grad is not None]
        if layout.world == 1 or not grads:
            return
        flat = _flatten_dense_tensors(grads)
        if layout.edp_size > 1:
            dist.all_reduce(flat, group=self.pm.mesh.edp_group)
        flat /= layout.world
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(reduced)

    def _clip(self) -> Tensor:
        """Clip by the norm of the whole model's gradient (dense counted once, each expert once)
        and return that norm; max_norm=inf only measures it."""
        pm = self.pm

        def sq(params: list[nn.Parameter]) -> Tensor:
            grads = [p.grad.float().square().sum() for p in params if p.grad is not None]
            return torch.stack(grads).sum() if grads else torch.zeros((), device=pm.mesh.device)

        expert_sq = sq(pm.expert_params)
        if pm.mesh.layout.ep_size > 1:
            dist.all_reduce(expert_sq, group=pm.mesh.ep_group)
        norm = (sq(pm.dense_params) + expert_sq).sqrt()
        if math.isfinite(self.max_norm):
            coef = (self.max_norm / (norm + 1e-6)).clamp(max=1.0)
            grads = [p.grad for p in pm.module.parameters() if p.grad is not None]
            torch._foreach_mul_(grads, coef)
        return norm

    # ---- state -------------------------------------------------------------------------------

    def model_state(self) -> dict[str, Fragment]:
        return module_fragments(self.pm.module, self.pm.mesh.layout)
