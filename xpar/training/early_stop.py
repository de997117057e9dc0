"""Early stopping and the best model by one validation metric (`finetune.monitor`,
`finetune.patience`, `finetune.keep_best`)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch.distributed as dist

from xpar.model import ModelConfig
from xpar.parallel.parallelize import ParallelModel
from xpar.parallel.state import full_model_state
from xpar.training.model_dir import TaskInfo, write_model_dir

BEST_DIR = "best"
BEST_INFO = "best.json"


class Monitor:
    """Follows `metric` over evaluations: the best value and its step, and how many
    evaluations in a row brought no new best (`patience` of them stop the run; 0 never)."""

    def __init__(self, metric: str, mode: str, patience: int) -> None:
        self.metric, self.mode, self.patience = metric, mode, patience
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0

    def update(self, step: int, metrics: dict[str, Any]) -> bool:
        """Take an evaluation's metrics; True when it is a new best."""
        value = metrics[self.metric]
        better = math.isfinite(value) and (
            self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        )
        if better:
            self.best, self.best_step, self.bad_evals = float(value), step, 0
        else:
            self.bad_evals += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evals >= self.patience

    def describe(self) -> str:
        return f"{self.metric}={self.best:.4f} at step {self.best_step}"

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "best": self.best, "best_step": self.best_step,
                "bad_evals": self.bad_evals}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """A resumed run goes on counting; a checkpoint that followed another metric (or none)
        starts over."""
        if state and state.get("metric") == self.metric:
            self.best, self.best_step = state["best"], state["best_step"]
            self.bad_evals = int(state["bad_evals"])


def save_best(
    pm: ParallelModel,
    run_dir: Path,
    model_cfg: ModelConfig,
    task: TaskInfo,
    tokenizer: str | None,
    monitor: Monitor,
) -> Path:
    """Write the model as it is now to `run_dir/best` (a model dir, replaced whole) with
    `best.json` {step, metric, value} inside. Every rank takes part (the experts are
    gathered); rank 0 writes."""
    state = full_model_state(pm)
    out = Path(run_dir) / BEST_DIR
    if pm.mesh.layout.rank == 0:
        source = f"{run_dir} step {monitor.best_step} ({monitor.metric}={monitor.best})"
        write_model_dir(out, state, model_cfg, task, tokenizer, source=source, overwrite=True)
        info = {"step": monitor.best_step, "metric": monitor.metric, "value": monitor.best}
        tmp = out / f".{BEST_INFO}.tmp"
        tmp.write_text(json.dumps(info) + "\n")
        os.replace(tmp, out / BEST_INFO)
    if pm.mesh.layout.world > 1:
        dist.barrier()
    return out
