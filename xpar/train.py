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
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from xpar.checks import UserError
from xpar.config import register_configs, to_train_config

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
log = logging.getLogger("xpar.train")


def fail(message: str, error: Exception) -> None:
    """Report bad input as one line and exit 2 (set XPAR_TRACEBACK=1 for the traceback)."""
    if os.environ.get("XPAR_TRACEBACK"):
        raise error
    print(f"xpar: error: {message}", file=sys.stderr)
    sys.exit(2)


def check_overrides(overrides: list[str]) -> None:
    """Compose once up front so an unknown group option, key or badly typed value is reported
    in one line instead of Hydra's multi-line report. Sweeps (-m) and Hydra's own flags go
    straight to Hydra."""
    if any(arg.startswith("-") for arg in overrides):
        return
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            compose("config", overrides=overrides, return_hydra_config=True)
    except MissingConfigException as e:
        options = sorted(o for o in (e.options or []) if not o.startswith("schema"))
        fail(f"{str(e).splitlines()[0]}; valid options: {', '.join(options)}", e)
    except (HydraException, OmegaConfBaseException) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        fail("; ".join(lines[:2]), e)
    finally:
        GlobalHydra.instance().clear()


def run(cfg: DictConfig) -> None:
    """One job: check the config, write it resolved, train, print the final evaluation."""
    from xpar.training.trainer import Trainer, TrainingDiverged  # torch-heavy; after parsing

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        train_cfg = to_train_config(cfg)
        OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml", resolve=True)
        trainer = Trainer(train_cfg, run_dir, OmegaConf.to_container(cfg, resolve=True))
        log.info("run dir %s; %s", run_dir, trainer.data.description)
        result = trainer.fit()
    except (UserError, TrainingDiverged) as e:
        fail(str(e), e)
        return
    if result.val_loss is not None and not result.stopped_early:
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
    check_overrides(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
