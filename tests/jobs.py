"""Helpers for tests that compose or run training jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from xpar.config import CONF_DIR, TrainConfig, register_configs, to_train_config

from distributed import torchrun

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


def losses(run_dir: Path) -> dict[int, float]:
    """Step -> training loss of a run's metrics."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x["loss"] for x in lines if "loss" in x}


def train(tmp: Path, name: str, nproc: int, args: list[str]) -> dict[int, float]:
    """The loss curve of `xpar.train ARGS run_name=NAME` in `tmp`, in one process or under
    torchrun with `nproc`."""
    args = [*args, f"run_name={name}"]
    proc = run_cli(args, cwd=tmp) if nproc == 1 else torchrun(args, nproc, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return losses(tmp / "runs" / name)


def assert_close(a: dict, b: dict, rtol: float = 1e-5) -> None:
    """Two loss curves over the same steps, equal to a relative `rtol`."""
    assert sorted(a) == sorted(b)
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=rtol), step


def assert_same_tensors(a: dict, b: dict) -> None:
    """Two consolidated checkpoints' tensors (moments among them), bit for bit."""
    assert a.keys() == b.keys() and any(k.startswith("optim/exp_avg/") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
