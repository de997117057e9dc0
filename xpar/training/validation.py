"""Evaluation on the validation split, for any task: the metrics (xpar.tasks.runner), their
log line and records, the monitored metric with the best model, and the final per-label report.

Legend: B batch, W row width, L MoE layers, E experts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from xpar.config import TrainConfig
from xpar.data import DataBundle, eval_batches
from xpar.parallel.parallelize import ParallelModel
from xpar.persist.describe import TaskInfo
from xpar.tasks.metrics import format_report
from xpar.tasks.runner import LMRunner
from xpar.training.early_stop import Monitor
from xpar.training.stats import Tally
from xpar.training.tracking import Tracker

log = logging.getLogger("xpar.training.trainer")


class Validation:
    """Evaluates with the trainer's forward pass and follows `finetune.monitor`."""

    def __init__(
        self,
        cfg: TrainConfig,
        pm: ParallelModel,
        data: DataBundle,
        runner: LMRunner,
    ) -> None:
        self.cfg, self.pm, self.data, self.runner = cfg, pm, data, runner
        ft = cfg.finetune
        self.monitor = Monitor(*ft.monitored(cfg.task, data.floor is not None), ft.patience)
        self.task_metrics = cfg.task.metrics()[1:] if cfg.task.kind != "lm" else ()

    def task_info(self) -> TaskInfo:
        """What the weights are trained for, as checkpoints and model dirs record it."""
        task = self.cfg.task
        return TaskInfo(
            task.kind, self.data.labels, task.pooling if task.kind == "classify" else None
        )

    @torch.no_grad()
    def evaluate(
        self, forward: Callable[[torch.Tensor, Any], Any], tally: Tally
    ) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
        """(metrics, expert load [L, E] on the split, the task's counts summed over ranks).
        `val_loss` is the mean loss per target token (lm), per sequence (classify) or per
        labelled token (tag)."""
        model, layout = self.pm.module, self.pm.mesh.layout
        model.eval()
        micro = self.cfg.data.accumulation(layout.world)[0]
        batches = eval_batches(
            self.data.val, micro, self.cfg.trainer.eval_batches, layout.rank, layout.world
        )
        for rows_BW in batches:
            out = forward(rows_BW, model)
            tally.add(out, weight=self.runner.weight(rows_BW))
            tally.counts += self.runner.counts(out, rows_BW.to(tally.device))
        model.train()
        stats, _ = tally.reduce(self.pm.mesh)
        metrics = {"val_loss": stats.loss, **self.runner.metrics(stats.counts)}
        return metrics, stats.load_LE, stats.counts

    def log(
        self, step: int, metrics: dict[str, Any], load_LE: np.ndarray, tracker: Tracker
    ) -> bool:
        """Log an evaluation (adding the floor and gap when the data knows its floor) and
        follow the monitored metric; True when the model is a new best to keep
        (finetune.keep_best)."""
        msg = f"step {step}: val loss {metrics['val_loss']:.4f}"
        floor = self.data.floor
        if floor is not None:
            metrics.update(floor=floor, val_gap=metrics["val_loss"] - floor)
            msg += f" (floor {floor:.4f}, gap {metrics['val_gap']:.4f})"
        msg += "".join(f", {k[4:]} {metrics[k]:.4f}" for k in self.task_metrics)
        tracker.log(step, metrics)
        if load_LE.size:
            tracker.log_expert_load(step, load_LE, self.pm.module.cfg.moe_layer_ids())
        log.info(msg)
        return self.monitor.update(step, metrics) and self.cfg.finetune.keep_best

    def report(self, step: int, counts: np.ndarray, tracker: Tracker) -> None:
        """The per-label report of an evaluation: the console, metrics.jsonl, wandb and
        label_report.json (rank 0)."""
        rows = self.runner.report(counts)
        if not rows:
            return
        title = "label" if self.cfg.task.kind == "classify" else "entity type"
        if self.pm.mesh.layout.rank == 0:
            log.info("per-label report at step %d:\n%s", step, format_report(rows, title))
        tracker.log_report(step, title, rows)
