"""`python -m xpar.train [group=option ...] [key=value ...]`: train an MoE LM.

Hydra composes the job from conf/ (groups model, moe, data, optim, trainer, parallel,
deepspeed, logger, launcher, experiment, debug) over the typed schema in xpar.config. The run
writes to runs/<run_name>/: .hydra/ (config.yaml resolved, overrides.yaml, hydra.yaml),
train.log, metrics.jsonl, plots/, checkpoints/step_N/. Bad input ends the run with one line on
stderr and exit code 2, and a refused job leaves its run dir as it was (a new one is removed):
the config is checked before Hydra makes the run dir, and .hydra/ and train.log are written
only once the trainer has accepted the job (data, checkpoint, layout).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import time
from pathlib import Path

import hydra
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from xpar.checks import UserError, report_error
from xpar.compose import adopt_architecture, checked_job, compose_checked
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
LOG_FILE = "train.log"
INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


def fail(message: str, error: Exception | None = None) -> None:
    """Report bad input as one line and exit 2 (set XPAR_TRACEBACK=1 for the traceback).
    Under torchrun every rank reports, prefixed with its rank, and records the line as its
    root cause (see record_root_cause)."""
    if error is not None and os.environ.get("XPAR_TRACEBACK"):
        raise error
    world, rank, _ = world_from_env()
    where = f"[rank {rank}] " if world > 1 else ""
    record_root_cause(f"xpar: error: {where}{message}")
    sys.exit(report_error(f"{where}{message}"))


def record_root_cause(line: str) -> None:
    """Under torchrun, write `line` to the rank's elastic error file, which torchrun shows as
    the failure's root cause (instead of "To enable traceback see ..."), and to
    XPAR_ERROR_FILE when set (launch/torchrun.sh prints it last and exits 2)."""
    if path := os.environ.get("TORCHELASTIC_ERROR_FILE"):
        info = {"py_callstack": line, "timestamp": str(int(time.time()))}
        Path(path).write_text(json.dumps({"message": {"message": line, "extraInfo": info}}))
    if path := os.environ.get("XPAR_ERROR_FILE"):
        with open(path, "a") as f:  # O_APPEND: the ranks' lines do not interleave
            f.write(line + "\n")


class RunDir:
    """The run dir of a job Hydra has started: nothing is written into it until `accept`
    (the log is held in memory until then), and `refuse` removes it if the job left it empty,
    as Hydra made it for this job."""

    def __init__(self, path: Path, rank: int) -> None:
        self.path, self.rank = path, rank
        self._held = logging.handlers.MemoryHandler(
            capacity=1 << 20, flushLevel=logging.CRITICAL + 1
        )
        if rank == 0:
            logging.getLogger().addHandler(self._held)

    def accept(self, cfg: DictConfig) -> None:
        """Write .hydra/ (the resolved config, the overrides, Hydra's own config) and start
        train.log, in the console's format, with the lines held so far. Rank 0 only."""
        if self.rank != 0:
            return
        hydra_dir = self.path / ".hydra"
        hydra_dir.mkdir(parents=True, exist_ok=True)
        hc = HydraConfig.instance().cfg
        for name, node, resolve in (
            ("config.yaml", cfg, True),
            ("overrides.yaml", OmegaConf.create(list(hc.hydra.overrides.task)), False),
            ("hydra.yaml", hc, False),
        ):
            tmp = hydra_dir / f".{name}.tmp"
            OmegaConf.save(node, tmp, resolve=resolve)
            os.replace(tmp, hydra_dir / name)
        root = logging.getLogger()
        file = logging.FileHandler(self.path / LOG_FILE)
        file.setFormatter(next((h.formatter for h in root.handlers if h.formatter), None))
        self._held.setTarget(file)
        self._held.flush()
        root.removeHandler(self._held)
        root.addHandler(file)

    def refuse(self) -> None:
        """Drop the held log and remove the run dir (and a `runs/` above it) if empty."""
        logging.getLogger().removeHandler(self._held)
        if self.rank != 0:
            return
        made = [self.path] + ([self.path.parent] if self.path.parent.name == "runs" else [])
        for path in made:
            try:
                path.rmdir()  # only an empty dir
            except OSError:
                return


def run(cfg: DictConfig) -> None:
    """One job: check the config, train, print the final evaluation. The job is accepted (its
    config and log written into the run dir) once the trainer is built."""
    from xpar.persist.artefact import latest_checkpoint  # torch-heavy; after parsing
    from xpar.training.trainer import Trainer, TrainingDiverged

    export_submitit_tasks()
    quiet_other_ranks()
    world, rank, _ = world_from_env()
    run_dir = RunDir(Path(HydraConfig.get().runtime.output_dir), rank)
    trainer = None
    try:
        adopt_architecture(cfg, list(HydraConfig.get().overrides.task))
        train_cfg = to_train_config(cfg)
        if world > 1 and not dist.is_initialized():  # submitit's tasks join here
            join_checked(train_cfg)
        config = OmegaConf.to_container(cfg, resolve=True)
        config["launch"] = launch_facts(world)
        trainer = Trainer(train_cfg, run_dir.path, config)
        run_dir.accept(cfg)
        log.info("run dir %s; %s", run_dir.path, trainer.data.description)
        result = trainer.fit()
    except (UserError, TrainingDiverged) as e:
        if trainer is None:
            run_dir.refuse()
        fail(str(e), e)
        return
    except KeyboardInterrupt:
        if trainer is None:
            run_dir.refuse()
        newest = latest_checkpoint(run_dir.path / "checkpoints")
        where = f"the newest checkpoint is {newest}" if newest else "the run has no checkpoint"
        sys.exit(interrupted(f"interrupted without saving; {where}"))
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


def interrupted(what: str) -> int:
    """A second Ctrl-C, or one before training started (the first one during training saves
    and stops after the step): one line; the shell's exit code for SIGINT."""
    sys.stderr.write(f"xpar: {what}\n")
    return INTERRUPTED


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    register_configs()
    overrides = sys.argv[1:]
    try:
        composed = compose_checked(overrides)
        check_restartable(overrides)
        if composed is None and world_from_env()[0] > 1:
            raise UserError(
                "under torchrun, pass plain overrides only (no -m sweeps or Hydra flags)"
            )
        if composed is not None:
            cfg = checked_job(composed, overrides)
            if world_from_env()[0] > 1:
                join_and_share_run_name(cfg, overrides)
    except UserError as e:
        fail(str(e), e)
    except KeyboardInterrupt:
        sys.exit(interrupted("interrupted before the job started; nothing was written"))
    _hydra_main()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
