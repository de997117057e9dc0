"""Starting a run from other weights (`trainer.init_from`) and counting what a fine-tuning
policy trains (`finetune.train`; the policies are in xpar.model.trainable)."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor, nn

from xpar.checks import UserError
from xpar.model import ModelConfig
from xpar.model.trainable import head_names
from xpar.parallel.parallelize import ParallelModel, expert_parameter_names
from xpar.parallel.state import full_model_shapes, load_full_model_state
from xpar.tasks.config import TaskConfig
from xpar.training.model_dir import ModelFiles, read_model

__all__ = ["head_names", "load_init_weights", "trainable_counts"]


def trainable_counts(model: nn.Module, ep_size: int = 1) -> tuple[int, int]:
    """(trainable, total) parameters of the whole model: this process's expert banks hold
    1/ep_size of the experts, so they count ep_size times."""
    experts = set(expert_parameter_names(model))
    trainable = total = 0
    for name, p in model.named_parameters():
        n = p.numel() * (ep_size if name in experts else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def architecture_changes(source: ModelConfig, target: ModelConfig) -> list[str]:
    """`field (source -> target)` for every model/MoE setting the run changes from the
    weights' own (routing knobs such as moe.capacity_factor may change; shapes may not)."""
    a, b = _flat(dataclasses.asdict(source)), _flat(dataclasses.asdict(target))
    return [
        f"{k if k.startswith('moe.') else 'model.' + k} ({a.get(k)} -> {b.get(k)})"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def _short(names: list[str], limit: int = 6) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _head_loads(files: ModelFiles, task: TaskConfig, labels: list[str] | None) -> bool:
    """A task head carries over only to the same task over the same labels."""
    return task.kind != "lm" and files.task.kind == task.kind and files.task.labels == labels


def init_state(
    files: ModelFiles,
    shapes: dict[str, tuple[int, ...]],
    current: dict[str, Tensor],
    head: set[str],
    keep_head: bool,
) -> tuple[dict[str, Tensor], list[str]]:
    """The global state to load: every tensor of `shapes` from the source weights, except the
    head when it does not carry over (then this model's own, fresh). Returns it and what kept
    its fresh value. The source's unused head (an LM head under a task head) is dropped."""
    state, fresh = {}, []
    missing, wrong = [], []
    for name, shape in shapes.items():
        if name in head and not keep_head:
            state[name] = current[name]
            fresh.append(name)
            continue
        if name not in files.state:
            missing.append(name)
        elif tuple(files.state[name].shape) != tuple(shape):
            wrong.append(f"{name} {list(files.state[name].shape)} vs {list(shape)}")
        else:
            state[name] = files.state[name]
    where = f"trainer.init_from={files.path}"
    if missing:
        raise UserError(f"{where}: the weights lack {_short(missing)}; is it the same model?")
    if wrong:
        raise UserError(f"{where}: shapes differ (weights vs run): {_short(wrong)}")
    return state, fresh


def load_init_weights(
    pm: ParallelModel, path: str, task: TaskConfig, labels: list[str] | None
) -> str:
    """Load the weights at `path` (a model dir, a checkpoint, a checkpoints dir or a run dir)
    into `pm`, whatever its EP size: weights only, never optimizer state or step. The
    backbone must match; the task head loads only when the source was trained for the same
    task over the same labels, else it keeps its fresh init. Call it before DeepSpeed takes
    the module (its master copies are made from the weights at that point). Returns a line
    saying what was loaded."""
    files = read_model(path)
    module = pm.module
    shapes = full_model_shapes(pm)
    head = head_names(module) if task.kind != "lm" else set()
    keep_head = _head_loads(files, task, labels)
    if task.kind == "lm" and files.task.kind != "lm":
        raise UserError(
            f"trainer.init_from={path} holds a task={files.task.kind} model, which has no LM "
            f"head; continue it with task={files.task.kind}"
        )
    state, fresh = init_state(files, shapes, module.state_dict(), head, keep_head)
    load_full_model_state(pm, state)
    line = f"initialised from {files.path}: {len(state) - len(fresh)} tensors"
    if fresh:
        why = "different labels" if files.task.kind == task.kind else f"task {files.task.kind}"
        line += f"; fresh {task.kind} head (the weights were trained for {why})"
    changes = architecture_changes(files.model, module.cfg)
    if changes:
        line += f"; run differs from the weights in {_short(changes)}"
    return line
