"""The seam between the training loop and how a step is made: xpar's own data parallelism
(xpar.training.plain), DeepSpeed ZeRO-1/2 (xpar.training.zero) or PyTorch FSDP2
(xpar.training.fsdp). The loop uses only what `Backend` lists, so a backend is one module and
adding one touches nothing else but `build_backend`.

A step, as the loop drives it:

    for each micro-batch:
        with backend.micro_step(last) as module:   # the callable to run the model through
            out = forward(module, rows)
            backend.backward(loss / n)
    norm = backend.clip_grad_norm()                # gradients reduced and clipped
    outcome = backend.step(loss_finite, finite)     # applied, or skipped (weights untouched)

Checkpoints take the backend's state under xpar.persist.fragments' keys (the same for every
backend, so each reads the others'), as this rank's pieces.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from xpar.config import TrainConfig
from xpar.parallel.parallelize import ParallelModel
from xpar.persist.sharded import Fragment

Read = Callable[[dict[str, Fragment]], None]  # fills fragments from a checkpoint


@dataclass
class StepOutcome:
    """What became of an optimizer step."""

    applied: bool
    # fp16: skipped because the loss scale overflowed, which only lowers the scale (not a bad
    # step); says so, with the new scale.
    overflow: str | None = None


class Backend(Protocol):
    """What the training loop may use of a backend."""

    name: str  # as checkpoints record it
    optimizer: torch.optim.Optimizer  # whose param_groups' lr the schedule sets

    def micro_step(self, last: bool) -> AbstractContextManager[Callable[..., Any]]:
        """One micro-batch's forward and backward; yields what to call the model through.
        Gradients are reduced across ranks once, at the `last` micro-step."""
        ...

    def backward(self, loss: Tensor) -> None: ...

    def clip_grad_norm(self) -> Tensor:
        """After the last micro-step: reduce and clip the gradients (optim.grad_clip) and
        return the global gradient norm (a tensor, not yet read to the host)."""
        ...

    def step(self, loss_finite: bool, finite: bool) -> StepOutcome:
        """Apply the step when `finite` (losses and gradient norm finite on every rank) and the
        backend agrees, else leave weights and optimizer state as they were; gradients are
        zeroed either way."""
        ...

    def model_state(self) -> dict[str, Fragment]:
        """`model/*`: this rank's pieces of the weights (fp32 masters where the backend keeps
        them) and buffers: what a model dir holds."""
        ...

    def state(self) -> dict[str, Fragment]:
        """Everything a checkpoint holds of the model and optimizer (model_state and optim/*)."""
        ...

    def extra_state(self) -> dict[str, Any]:
        """The backend's own small JSON-able state (e.g. the fp16 loss scale)."""
        ...

    def load(self, read: Read, extra: dict[str, Any]) -> None:
        """Take a checkpoint's state: this rank reads only the pieces it holds."""
        ...


def build_backend(pm: ParallelModel, cfg: TrainConfig, micro: int, accum: int) -> Backend:
    """The backend `cfg` asks for, around the already parallelized model."""
    if cfg.parallel.shard == "fsdp":
        from xpar.training.fsdp import FsdpBackend

        return FsdpBackend(pm, cfg)
    if cfg.deepspeed.enabled:
        from xpar.training.zero import ZeroBackend  # DeepSpeed loads only when asked for

        return ZeroBackend(pm, cfg, micro, accum)
    from xpar.training.plain import PlainBackend

    return PlainBackend(pm, cfg.optim, cfg.finetune.head_lr)
