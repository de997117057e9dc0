"""Which checkpoint a run resumes from, and the trainer's state in and out of checkpoints.

Checkpoints hold the global model (every rank's experts, gathered), so a run of any EP size,
or a single process, can load them. Every rank reads; rank 0 alone writes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from xpar.checks import UserError
from xpar.parallel.parallelize import ParallelModel
from xpar.parallel.state import (
    full_model_shapes,
    full_model_state,
    full_optimizer_state,
    load_full_model_state,
    load_full_optimizer_state,
)
from xpar.training import checkpoint as ckpt

log = logging.getLogger(__name__)


def resume_path(resume: bool | str, root: Path) -> Path | None:
    """The checkpoint `trainer.resume` names, or None for a fresh run. A fresh run refuses a
    checkpoints dir that already holds checkpoints, which it would otherwise overwrite."""
    if resume is False:
        if ckpt.latest_checkpoint(root) is not None:
            raise UserError(
                f"{root} already holds checkpoints; pass trainer.resume=true to continue that "
                f"run, or another run_name to start a new one"
            )
        return None
    if resume is True:
        path = ckpt.latest_checkpoint(root)
        if path is None:
            log.warning("trainer.resume=true: no checkpoint in %s, starting at step 0", root)
        return path
    path = Path(resume)
    if not path.exists():
        raise UserError(f"trainer.resume={resume}: no such checkpoint")
    if not (path / "meta.json").exists():  # a checkpoints/ dir: its newest checkpoint
        newest = ckpt.latest_checkpoint(path)
        if newest is None:
            raise UserError(f"trainer.resume={resume}: holds no complete checkpoint")
        path = newest
    return path


def load_state(
    path: Path,
    pm: ParallelModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG from `path`; return the trainer's extra
    state. A bad checkpoint is reported with the next older one to try."""
    try:
        ck = ckpt.load_checkpoint(path, full_model_shapes(pm))
        load_full_model_state(pm, ck.model_state)
        load_full_optimizer_state(pm, optimizer, ckpt.match_optimizer(ck, optimizer))
    except UserError as e:
        older = [p for p in ckpt.complete_checkpoints(path.parent) if p != path]
        hint = f"; to resume from an earlier one pass trainer.resume={older[-1]}" if older else ""
        raise UserError(f"{e}{hint}") from e
    scheduler.load_state_dict(ck.scheduler_state)
    return ck.extra


def save_state(
    root: Path,
    step: int,
    pm: ParallelModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    extra: dict[str, Any],
    keep: int,
) -> Path:
    """Gather the global state (every rank takes part), write it from rank 0, prune to the
    newest `keep`, and wait until it is on disk everywhere."""
    model_state = full_model_state(pm)
    optimizer_state = full_optimizer_state(pm, optimizer)
    path = root / f"step_{step}"
    if pm.mesh.layout.rank == 0:
        path = ckpt.save_checkpoint(
            root, step, model_state, optimizer_state, scheduler.state_dict(), extra
        )
        ckpt.prune_checkpoints(root, keep)
    if pm.mesh.layout.world > 1:
        dist.barrier()
    return path
