"""Which checkpoint a run resumes from, and the trainer's state in and out of checkpoints.

Without DeepSpeed, checkpoints hold the global model (every rank's experts, gathered), so a run
of any EP size, or a single process, can load them; every rank reads, rank 0 alone writes.
Under DeepSpeed every rank writes its own partition (see xpar.training.zero_checkpoint).
"""

from __future__ import annotations

import logging
import os
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
from xpar.training import zero_checkpoint as zc

log = logging.getLogger(__name__)


RESTART_COUNTERS = {
    "TORCHELASTIC_RESTART_COUNT": "torchrun restart",  # torchrun --max-restarts
    "SLURM_RESTART_COUNT": "Slurm requeue",  # a preempted or requeued job
}


def restart_reason() -> str | None:
    """Why this process continues an interrupted job (`torchrun restart 1`, `Slurm requeue 2`),
    or None for a job's first attempt."""
    for var, what in RESTART_COUNTERS.items():
        count = os.environ.get(var, "0")
        if count.isdigit() and int(count) > 0:
            return f"{what} {count}"
    return None


def resume_path(resume: bool | str, root: Path) -> Path | None:
    """The checkpoint `trainer.resume` names, or None for a fresh run. A fresh run refuses a
    checkpoints dir that already holds checkpoints, which it would otherwise overwrite. A
    restarted attempt of a job (restart_reason) resumes the run's newest checkpoint, whatever
    `resume` names: that is where the attempt it replaces got to."""
    if (why := restart_reason()) is not None and (newest := ckpt.latest_checkpoint(root)):
        log.info("%s: resuming the run's newest checkpoint %s", why, newest)
        return newest
    if resume is False and why is not None:  # restarted before its first checkpoint
        return None
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
    engine: Any = None,
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG from `path`; return the trainer's extra
    state. Any checkpoint loads into any run: a DeepSpeed one on its own world and EP size
    through DeepSpeed, anything else through the global (single-process) state, re-sharded.
    A bad checkpoint is reported with the next older one to try."""
    try:
        if zc.is_zero_checkpoint(path):
            desc = zc.verify(path, pm)
            zc.check_model(path, desc, pm)
            zc.restore_rng(path, desc, pm.mesh.layout.rank)
            if engine is not None and zc.same_layout(desc, pm):
                zc.load_same_layout(path, pm, engine)
                load_scheduler(scheduler, ckpt.read_json(path / "scheduler.json"))
                return ckpt.read_json(path / "trainer.json")
            if not all(p.requires_grad for p in pm.module.parameters()):
                raise UserError(
                    f"{path} is a DeepSpeed checkpoint saved on {desc['world']} ranks at EP "
                    f"{desc['ep_size']}; a run with frozen parameters (finetune.train) resumes "
                    f"it only at that layout"
                )
            ck = zc.read_as_plain(path)
            log.info(
                "re-sharding %s (saved on %d ranks, EP %d)", path, desc["world"], desc["ep_size"]
            )
        else:
            ck = ckpt.load_checkpoint(path, full_model_shapes(pm))
        if engine is not None:
            zc.load_plain_into_engine(ck, pm, engine)
        else:
            load_full_model_state(pm, ck.model_state)
            load_full_optimizer_state(pm, optimizer, ckpt.match_optimizer(ck, optimizer))
    except UserError as e:
        older = [p for p in ckpt.complete_checkpoints(path.parent) if p != path]
        hint = f"; to resume from an earlier one pass trainer.resume={older[-1]}" if older else ""
        raise UserError(f"{e}{hint}") from e
    load_scheduler(scheduler, ck.scheduler_state)
    return ck.extra


def load_scheduler(scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict[str, Any]) -> None:
    """Load a LambdaLR state saved with any number of parameter groups (DeepSpeed runs have an
    expert group more): every group follows the same schedule from the same base lr."""
    n = len(scheduler.optimizer.param_groups)
    for key in ("base_lrs", "_last_lr"):
        values = state.get(key)
        if isinstance(values, list) and len(values) != n:
            if len(set(values)) != 1:
                raise UserError(f"the checkpoint's schedule has per-group {key} {values}")
            state[key] = values[:1] * n
    scheduler.load_state_dict(state)
    # The groups' current lr too: a re-sharded optimizer state does not carry it.
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr


def save_state(
    root: Path,
    step: int,
    pm: ParallelModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    extra: dict[str, Any],
    keep: int,
    engine: Any = None,
) -> Path:
    """Save a checkpoint (every rank takes part) and prune to the newest `keep`. Under
    DeepSpeed every rank writes its own partition; otherwise the global state is gathered and
    rank 0 writes it. Returns once it is on disk everywhere."""
    if engine is not None:
        return zc.save_zero(root, step, pm, engine, scheduler.state_dict(), extra, keep)
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
