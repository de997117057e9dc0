"""`python -m xpar.train [group=option ...] [key=value ...]`: train an MoE LM.

Hydra composes the job from conf/ (groups model, moe, data, optim, trainer, parallel,
deepspeed, logger, launcher, experiment, debug) over the typed schema in xpar.config. The run
writes to runs/<run_name>/: .hydra/config.yaml (resolved), metrics.jsonl, plots/,
checkpoints/step_N/. Bad input ends the run with one line on stderr and exit code 2.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from xpar.checks import UserError, report_error
from xpar.config import CONF_DIR, TrainConfig, register_configs, to_train_config
from xpar.parallel.mesh import check_layout, join_process_group, world_from_env

log = logging.getLogger("xpar.train")


def fail(message: str, error: Exception | None = None) -> None:
    """Report bad input as one line and exit 2 (set XPAR_TRACEBACK=1 for the traceback).
    Under torchrun every rank reports, prefixed with its rank."""
    if error is not None and os.environ.get("XPAR_TRACEBACK"):
        raise error
    world, rank, _ = world_from_env()
    where = f"[rank {rank}] " if world > 1 else ""
    sys.exit(report_error(f"{where}{message}"))


def check_overrides(overrides: list[str]) -> DictConfig | None:
    """Compose once up front so an unknown group option, key or badly typed value is reported
    in one line instead of Hydra's multi-line report; returns the composed config (with its
    hydra node). Sweeps (-m) and Hydra's own flags go straight to Hydra (None)."""
    if any(arg.startswith("-") for arg in overrides):
        return None
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose("config", overrides=overrides, return_hydra_config=True)
    except MissingConfigException as e:
        options = sorted(o for o in (e.options or []) if not o.startswith("schema"))
        fail(f"{str(e).splitlines()[0]}; valid options: {', '.join(options)}", e)
    except (HydraException, OmegaConfBaseException) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        fail("; ".join(lines[:2]), e)
    finally:
        GlobalHydra.instance().clear()


def adopt_architecture(job: DictConfig, overrides: list[str]) -> None:
    """`trainer.resume=PATH` and `trainer.init_from=PATH` make the run take PATH's
    architecture (the `model` and `moe` sections, which every artefact holds), so that
    resuming a checkpoint from anywhere, or fine-tuning an upcycled, imported or earlier model,
    needs no model flags. The command line's own `model.KEY=`/`moe.KEY=` values, and those of
    a `moe=NAME` option, still win (routing knobs such as moe.capacity_factor may change;
    shapes must match), and `model=NAME` turns it off. A resume path that holds no artefact is
    left to the trainer, which says what it found there."""
    from xpar.persist import read_model_info  # torch-heavy; after parsing

    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    if "model" in keys:
        return
    resume = OmegaConf.select(job, "trainer.resume")
    if isinstance(resume, str) and resume.lower() not in ("true", "false"):
        try:
            arch_of = read_model_info(resume)[0]
        except UserError:
            return
    elif path := OmegaConf.select(job, "trainer.init_from"):
        arch_of = read_model_info(path)[0]
    else:
        return
    for option in [o.split("=", 1)[1] for o in overrides if o.startswith("moe=")]:
        keys |= {f"moe.{k}" for k in OmegaConf.load(Path(CONF_DIR) / "moe" / f"{option}.yaml")}
    arch = dataclasses.asdict(arch_of)
    moe = arch.pop("moe")
    # merge_with, not assignment: OmegaConf 2.3 refuses a dict assigned over a None dataclass
    # node (model.mla, moe).
    with open_dict(job):
        job.model.merge_with({k: v for k, v in arch.items() if f"model.{k}" not in keys})
        if moe is None:
            job.moe = None
        else:
            # moe.d_model stays conf/config.yaml's ${model.d_model}.
            kept = {k: v for k, v in moe.items() if f"moe.{k}" not in keys and k != "d_model"}
            job.merge_with({"moe": kept})


def join_checked(cfg: TrainConfig) -> None:
    """Check the layout on every rank before any collective (a bad one then fails everywhere
    without a hang), then join the job's process group on the rank's device."""
    from xpar.training.trainer import pick_device  # torch-heavy; after parsing

    check_layout(cfg.parallel, cfg.moe, world_from_env()[0])
    join_process_group(pick_device(cfg.trainer.device), cfg.parallel.timeout_s)


def prepare_distributed(composed: DictConfig | None, overrides: list[str]) -> None:
    """Under torchrun, before Hydra starts the job: join (checked, see join_checked) and give
    every rank rank 0's run name (each rank would resolve ${now:...} itself)."""
    if composed is None:
        fail("under torchrun, pass plain overrides only (no -m sweeps or Hydra flags)")
    HydraConfig.instance().set_config(composed)
    job = copy.deepcopy(composed)
    with open_dict(job):
        del job["hydra"]
    try:
        adopt_architecture(job, overrides)
        cfg = to_train_config(job)
        join_checked(cfg)
    except UserError as e:
        fail(str(e), e)
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
        fail(
            f"torchrun --max-restarts={restarts} needs run_name=NAME (the same on every "
            "attempt) so that a restart resumes the run's newest checkpoint; "
            "launch/torchrun.sh sets one"
        )
    # torchrun's shared store keeps a killed attempt's keys, which the next attempt would read
    # as its peers' addresses and fail (seen with torch 2.13); a store per round is clean.
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        fail(
            f"torchrun --max-restarts={restarts} needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
            "in torchrun's environment (a fresh store per restart); launch/torchrun.sh sets it"
        )


def quiet_other_ranks() -> None:
    """Only rank 0 writes the log file and logs progress; other ranks log warnings."""
    if world_from_env()[1] == 0:
        return
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)


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
    composed = check_overrides(sys.argv[1:])
    check_restartable(sys.argv[1:])
    if world_from_env()[0] > 1:
        prepare_distributed(composed, sys.argv[1:])
    _hydra_main()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
