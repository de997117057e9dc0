"""What the model is trained for (`task=lm|classify|tag`) and how it is fine-tuned
(`finetune.*`), part of the job's schema in xpar.config."""

from __future__ import annotations

from dataclasses import dataclass

from xpar.checks import UserError, at_least, one_of
from xpar.model.trainable import POLICIES as FREEZE_POLICIES

TASKS = ("lm", "classify", "tag")
POOLINGS = ("last", "mean")


@dataclass
class TaskConfig:
    """What the model is trained to do (`task=lm|classify|tag`): next-token prediction, one
    label per sequence from the hidden states pooled at the last token or over all tokens, or
    one label per token."""

    kind: str = "lm"
    pooling: str = "last"  # classify only

    def __post_init__(self) -> None:
        one_of("task.kind", self.kind, TASKS)
        one_of("task.pooling", self.pooling, POOLINGS)

    def metrics(self, floor: bool = False) -> tuple[str, ...]:
        """The validation metrics an evaluation logs (val_gap: the LM on the embedded corpus,
        whose entropy floor is known)."""
        if self.kind == "lm":
            return ("val_loss", "val_gap") if floor else ("val_loss",)
        return TASK_METRICS[self.kind]


TASK_METRICS = {
    "classify": ("val_loss", "val_accuracy", "val_macro_f1"),
    "tag": ("val_loss", "val_precision", "val_recall", "val_f1"),
}
DEFAULT_MONITOR = {"lm": "val_loss", "classify": "val_accuracy", "tag": "val_f1"}


MONITOR_MODES = ("min", "max")


@dataclass
class FinetuneConfig:
    """Fine-tuning controls. `train` picks what trains (the rest is frozen): `all`, the task
    (or LM) head alone, the routed experts and the head, or the routers and the head.
    `monitor` is the validation metric for early stopping and the best model (None: val_loss
    for lm, val_accuracy for classify, val_f1 for tag)."""

    train: str = "all"
    head_lr: float | None = None  # the head's learning rate; None: optim.lr
    monitor: str | None = None
    mode: str | None = None  # min | max; None: min for *loss, max otherwise
    patience: int = 0  # evaluations without a new best before stopping; 0: never stop early
    keep_best: bool = False  # write the best model to <run dir>/best (a model dir)

    def __post_init__(self) -> None:
        one_of("finetune.train", self.train, FREEZE_POLICIES)
        if self.head_lr is not None:
            at_least("finetune.head_lr", self.head_lr, 0.0, strict=True)
        if self.mode is not None:
            one_of("finetune.mode", self.mode, MONITOR_MODES)
        at_least("finetune.patience", self.patience, 0)

    def monitored(self, task: TaskConfig, floor: bool) -> tuple[str, str]:
        """(metric, min|max) that early stopping and the best model follow."""
        metric = self.monitor or DEFAULT_MONITOR[task.kind]
        valid = task.metrics(floor)
        if metric not in valid:
            raise UserError(
                f"finetune.monitor={metric!r} is not a metric of task={task.kind}; valid: "
                f"{', '.join(valid)}"
            )
        lower = metric.endswith(("loss", "gap"))
        return metric, self.mode or ("min" if lower else "max")
