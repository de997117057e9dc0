"""Early stopping by one validation metric (`finetune.monitor`, `finetune.patience`), and the
best value so far, whose model `finetune.keep_best` keeps (xpar.training.checkpointing)."""

from __future__ import annotations

import math
from typing import Any


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

    def best_info(self) -> dict[str, Any]:
        """The best evaluation so far, as best.json records it."""
        return {"step": self.best_step, "metric": self.metric, "value": self.best}

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "best": self.best, "best_step": self.best_step,
                "bad_evals": self.bad_evals}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """A resumed run goes on counting; a checkpoint that followed another metric (or none)
        starts over."""
        if state and state.get("metric") == self.metric:
            self.best, self.best_step = state["best"], state["best_step"]
            self.bad_evals = int(state["bad_evals"])
