"""Helpers for tests that compose or run training jobs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from xpar.config import CONF_DIR, TrainConfig, register_configs, to_train_config

REPO = Path(__file__).resolve().parent.parent
# A fast CPU job: the tiny model on a small corpus, no progress bar.
FAST = [
    "trainer.device=cpu",
    "trainer.progress=false",
    "data.num_train=512",
    "data.num_val=64",
    "data.batch_size=8",
]


def compose_job(overrides: list[str]) -> DictConfig:
    """The job config as @hydra.main would hand it over (hydra node set aside)."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def build(overrides: list[str]) -> TrainConfig:
    return to_train_config(compose_job(overrides))


def run_cli(args: list[str], cwd: Path, timeout: float = 600, **env: str):
    """`python -m xpar.train ARGS` in `cwd` (runs land in cwd/runs/)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_SILENT": "true", **env}
    return subprocess.run(
        [sys.executable, "-m", "xpar.train", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
