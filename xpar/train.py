"""`python -m xpar.train [group=option ...] [key=value ...]`: train an MoE LM.

Hydra composes the job from conf/ (groups model, moe, data, optim, trainer, parallel,
deepspeed, logger, launcher, experiment, debug) over the typed schema in xpar.config. The run
writes to runs/<run_name>/: .hydra/config.yaml (resolved), metrics.jsonl, plots/,
checkpoints/step_N/. Bad input ends the run with one line on stderr and exit code 2.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from xpar.checks import UserError, report_error
from xpar.compose import adopt_architecture, compose_checked
from xpar.config import CONF_DIR, register_configs, to_train_config
from xpar.launch import (
    check_restartable,
    export_submitit_tasks,
    join_and_share_run_name,
    join_checked,
    launch_facts,
    quiet_other_ranks,
)
from xpar.parallel.mesh import world_from_env

log = logging.getLogger("xpar.train")


def fail(message: str, error: Exception | None = None) -> None:
    """Report bad input as one line and exit 2 (set XPAR_TRACEBACK=1 for the traceback).
    Under torchrun every rank reports, prefixed with its rank."""
    if error is not None and os.environ.get("XPAR_TRACEBACK"):
        raise error
    world, rank, _ = world_from_env()
    where = f"[rank {rank}] " if world > 1 else ""
    sys.exit(report_error(f"{where}{message}"))


def run(cfg: DictConfig) -> None:
    """One job: check the config, write it resolved, train, print the final evaluation."""
    from xpar.training.trainer import Trainer, TrainingDiverged  # torch-heavy; after parsing

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    export_submitit_tasks()
    quiet_other_ranks()
    world, rank, _ = world_from_env()
    try:
        adopt_architecture(cfg, list(HydraConfig.get().overrides.task))
        train_cfg = to_train_config(cfg)
        if world > 1 and not dist.is_initialized():  # submitit's tasks join here
            join_checked(train_cfg)
        if world > 1:  # every rank's Hydra wrote .hydra/ first: then overwrite
            dist.barrier()
        if rank == 0:
            OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml", resolve=True)
        config = OmegaConf.to_container(cfg, resolve=True)
        config["launch"] = launch_facts(world)
        trainer = Trainer(train_cfg, run_dir, config)
        log.info("run dir %s; %s", run_dir, trainer.data.description)
        result = trainer.fit()
    except (UserError, TrainingDiverged) as e:
        fail(str(e), e)
        return
    if rank != 0:
        return
    if result.val_loss is None or result.stopped_early:
        return
    if train_cfg.task.kind != "lm":
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if k != "val_loss")
        print(f"final validation loss {result.val_loss:.4f} nats/label; {shown}")
        return
    line = f"final validation loss {result.val_loss:.4f} nats/token"
    if result.floor is not None:
        gap = result.val_loss - result.floor
        line += f"; entropy floor {result.floor:.4f} (gap {gap:.4f})"
    print(line)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    register_configs()
    overrides = sys.argv[1:]
    try:
        composed = compose_checked(overrides)
        check_restartable(overrides)
        if world_from_env()[0] > 1:
            join_and_share_run_name(composed, overrides)
    except UserError as e:
        fail(str(e), e)
    _hydra_main()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
