"""AdamW and its learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from xpar.config import OptimConfig
from xpar.model.trainable import head_names


def decay_split(shapes: list[tuple[str, Sequence[int]]]) -> tuple[list[str], list[str]]:
    """Names that decay (matrices and expert banks) and names that do not (vectors: norm
    weights), each in the given (module) order."""
    return [n for n, s in shapes if len(s) >= 2], [n for n, s in shapes if len(s) < 2]


def param_groups(model: nn.Module, weight_decay: float, head_lr: float | None = None) -> list[dict]:
    """The AdamW groups of the model's trainable parameters (see group_params)."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return group_params(named, head_names(model), weight_decay, head_lr)


def group_params(
    named: dict[str, nn.Parameter], head: set[str], weight_decay: float, head_lr: float | None
) -> list[dict]:
    """decay_split's decaying and non-decaying groups, in that order; with `head_lr`, the
    parameters named in `head` form groups of their own at that learning rate. Empty groups
    (everything in them frozen) are left out."""
    head = head if head_lr is not None else set()
    groups = []
    for names, extra in (
        ([n for n in named if n not in head], {}),
        ([n for n in named if n in head], {"lr": head_lr}),
    ):
        decay, no_decay = decay_split([(n, named[n].shape) for n in names])
        groups += [
            {"params": [named[n] for n in decay], "weight_decay": weight_decay, **extra},
            {"params": [named[n] for n in no_decay], "weight_decay": 0.0, **extra},
        ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module,
    cfg: OptimConfig,
    device: torch.device,
    head_lr: float | None = None,
    foreach: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters (the head at `head_lr` when given); fused
    kernels on CUDA unless told not to, else torch's choice of `foreach` unless given."""
    fused = device.type == "cuda" if cfg.fused is None else cfg.fused
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, head_lr),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused,
        foreach=None if fused else foreach,
    )


def adamw_state(optimizer: torch.optim.Optimizer, p: Tensor, group: dict) -> dict[str, Tensor]:
    """The AdamW state of `p` (a parameter of `group`), created as AdamW's first step would
    (zero moments, step 0) if it has none yet, so that it can be saved or loaded into first."""
    state = optimizer.state[p]
    if not state:
        on_device = group.get("fused") or group.get("capturable")
        step = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
        state.update(step=step, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
    return state


def lr_multiplier(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Linear warmup over `warmup_steps`, then decay to `min_lr_ratio` at `total_steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    if cfg.schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    # A plain function, not a callable object: LambdaLR then keeps it out of its state dict.
    def multiplier(step: int) -> float:
        return lr_multiplier(step, cfg, total_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def load_scheduler(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict[str, Any]) -> None:
    """Go on with a saved schedule: its step, with this run's base learning rates (the schedule
    is a function of the step and the config), whatever parameter groups the saving run had
    (DeepSpeed runs have an expert group more, finetune.head_lr two groups of its own)."""
    scheduler.last_epoch = int(state["last_epoch"])
    scheduler._step_count = int(state.get("_step_count", scheduler.last_epoch + 1))
    step = scheduler.last_epoch
    lrs = [base * f(step) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    scheduler._last_lr = list(lrs)
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
