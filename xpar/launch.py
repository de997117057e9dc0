"""How a training job's processes come together, before and as Hydra runs it: torchrun's and
submitit's ranks join one process group (the layout checked first, so a bad one fails on every
rank), share rank 0's run name, and log quietly beside rank 0; a job that may restart is checked
for what a restart needs; and the facts of the launch go to the tracker."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from xpar.checks import UserError
from xpar.config import TrainConfig
from xpar.parallel.mesh import check_layout, join_process_group, world_from_env


def join_checked(cfg: TrainConfig) -> None:
    """Check the layout on every rank before any collective (a bad one then fails everywhere
    without a hang), then join the job's process group on the rank's device."""
    from xpar.training.trainer import pick_device  # torch-heavy; after parsing

    check_layout(cfg.parallel, cfg.moe, world_from_env()[0])
    join_process_group(pick_device(cfg.trainer.device), cfg.parallel.timeout_s)


def join_and_share_run_name(cfg: TrainConfig, overrides: list[str]) -> None:
    """Under torchrun, before Hydra starts the job: join (checked, see join_checked) and give
    every rank rank 0's run name (each rank would resolve ${now:...} itself)."""
    join_checked(cfg)
    if not any(arg.startswith("run_name=") for arg in overrides):
        name = [cfg.run_name]
        dist.broadcast_object_list(name, src=0)
        sys.argv.append(f"run_name={name[0]}")


def check_restartable(overrides: list[str]) -> None:
    """A torchrun job that may restart needs a fixed run name (each attempt would otherwise
    resolve ${now:...} anew and start over in a new run dir) and a store per attempt."""
    restarts = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")
    if not (restarts.isdigit() and int(restarts) > 0):
        return
    if not any(arg.startswith("run_name=") for arg in overrides):
        raise UserError(
            f"torchrun --max-restarts={restarts} needs run_name=NAME (the same on every "
            "attempt) so that a restart resumes the run's newest checkpoint; "
            "launch/torchrun.sh sets one"
        )
    # torchrun's shared store keeps a killed attempt's keys, which the next attempt would read
    # as its peers' addresses and fail (seen with torch 2.13); a store per round is clean.
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise UserError(
            f"torchrun --max-restarts={restarts} needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
            "in torchrun's environment (a fresh store per restart); launch/torchrun.sh sets it"
        )


def quiet_other_ranks() -> None:
    """Only rank 0 logs progress (and writes train.log); other ranks log warnings."""
    if world_from_env()[1] != 0:
        logging.getLogger().setLevel(logging.WARNING)


def export_submitit_tasks() -> None:
    """A job that hydra-submitit-launcher started as several tasks (launcher=slurm or
    submitit_local, hydra.launcher.tasks_per_node > 1) gets torchrun's variables (RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...) from submitit's job environment. The sweep fixed
    the run dir when it was submitted, so the tasks already share it."""
    if not os.environ.get("SUBMITIT_EXECUTOR") or "RANK" in os.environ:
        return
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def launch_facts(world: int) -> dict[str, Any]:
    """How Hydra and the launcher started this job, for the tracker (wandb's run name, group
    and tags come from these and the config)."""
    hc = HydraConfig.get()
    sweep = hc.mode == RunMode.MULTIRUN
    return {
        "world": world,
        "experiment": hc.runtime.choices.get("experiment"),
        "sweep": Path(hc.sweep.dir).name if sweep else None,
        "job": (hc.job.override_dirname or str(hc.job.num)) if sweep else None,
    }
