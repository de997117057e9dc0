"""Starting a run from other weights (`trainer.init_from`) and counting what a fine-tuning
policy trains (`finetune.train`; the policies are in xpar.model.trainable)."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from xpar.checks import UserError, short_list
from xpar.model import ModelConfig
from xpar.model.trainable import head_names
from xpar.parallel.parallelize import ParallelModel, expert_parameter_names
from xpar.persist.artefact import open_artefact
from xpar.persist.fragments import global_shapes, module_fragments, param_name
from xpar.tasks.config import TaskConfig

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


def load_init_weights(
    pm: ParallelModel, path: str, task: TaskConfig, labels: list[str] | None
) -> str:
    """Load the weights at `path` (a model dir, a checkpoint, a checkpoints dir or a run dir)
    into `pm`, whatever its layout: weights only, never optimizer state or step, and each rank
    reads only what it holds. The backbone must match; the task head loads only when the
    source was trained for the same task over the same labels, else it keeps its fresh init.
    Call it before a backend takes the module (DeepSpeed copies the weights when it starts).
    Returns a line saying what was loaded."""
    source = open_artefact(path, pm.mesh)
    saved = source.description
    if task.kind == "lm" and saved.task.kind != "lm":
        raise UserError(
            f"trainer.init_from={path} holds a task={saved.task.kind} model, which has no LM "
            f"head; continue it with task={saved.task.kind}"
        )
    module = pm.module
    head = head_names(module) if task.kind != "lm" else set()
    # A task head carries over only to the same task over the same labels.
    keep_head = task.kind != "lm" and saved.task.kind == task.kind and saved.task.labels == labels
    fragments = module_fragments(module, pm.mesh.layout)
    shapes = global_shapes(module, pm.mesh.layout.ep_size)
    load = {k: v for k, v in fragments.items() if keep_head or param_name(k) not in head}
    missing, wrong = [], []
    for key in load:
        name, info = param_name(key), saved.tensors.get(key)
        if info is None:
            missing.append(name)
        elif list(info.shape) != list(shapes[name]):
            wrong.append(f"{name} {list(info.shape)} vs {list(shapes[name])}")
    where = f"trainer.init_from={source.path}"
    if missing:
        raise UserError(f"{where}: the weights lack {short_list(missing)}; is it the same model?")
    if wrong:
        raise UserError(f"{where}: shapes differ (weights vs run): {short_list(wrong)}")
    source.read(load)
    line = f"initialised from {source.path}: {len(load)} tensors"
    if len(load) < len(fragments):
        why = "different labels" if saved.task.kind == task.kind else f"task {saved.task.kind}"
        line += f"; fresh {task.kind} head (the weights were trained for {why})"
    changes = architecture_changes(saved.model, module.cfg)
    if changes:
        line += f"; run differs from the weights in {short_list(changes)}"
    return line
