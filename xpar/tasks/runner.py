"""What the trainer does differently per task: how a batch of rows goes through the model, how
much an evaluation batch weighs, and which counts an evaluation sums (over ranks, in the same
all-reduce as the losses) to give its metrics and the final per-label report.

Legend: B batch, L sequence length + 1 (the LM's rows), W row width, C labels, T entity types.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from xpar.model import LMOutput
from xpar.tasks import metrics as M
from xpar.tasks.rows import IGNORE, unpack_classify, unpack_tag


class LMRunner:
    """Next-token prediction over rows of L token ids."""

    kind = "lm"
    num_counts = 0

    def tokens(self, rows_BL: Tensor) -> Tensor:
        return rows_BL

    def forward(self, module: Any, rows_BL: Tensor) -> LMOutput:
        return module(rows_BL[:, :-1], targets_BS=rows_BL[:, 1:])

    def weight(self, rows_BL: Tensor) -> float:
        """An evaluation batch's weight in the mean loss: its target tokens."""
        return rows_BL[:, 1:].numel()

    def counts(self, out: LMOutput, rows_BL: Tensor) -> Tensor:
        return torch.zeros(0, dtype=torch.float64, device=rows_BL.device)

    def metrics(self, counts: np.ndarray) -> dict[str, float]:
        return {}

    def report(self, counts: np.ndarray) -> list[dict]:
        return []


class ClassifyRunner(LMRunner):
    """One label per sequence; counts: the confusion matrix [C, C]."""

    kind = "classify"

    def __init__(self, labels: list[str]) -> None:
        self.labels = labels
        self.num_counts = len(labels) ** 2

    def tokens(self, rows_BW: Tensor) -> Tensor:
        return unpack_classify(rows_BW)[0]

    def forward(self, module: Any, rows_BW: Tensor) -> LMOutput:
        tokens_BS, lengths_B, labels_B = unpack_classify(rows_BW)
        return module(tokens_BS, lengths_B=lengths_B, labels_B=labels_B)

    def weight(self, rows_BW: Tensor) -> float:
        return rows_BW.shape[0]

    def counts(self, out: LMOutput, rows_BW: Tensor) -> Tensor:
        labels_B = unpack_classify(rows_BW)[2]
        conf_CC = M.confusion_matrix(labels_B, out.logits.argmax(-1), len(self.labels))
        return conf_CC.flatten().double()

    def metrics(self, counts: np.ndarray) -> dict[str, float]:
        scores = M.classification_scores(self._confusion(counts))
        return {f"val_{k}": v for k, v in scores.items()}

    def report(self, counts: np.ndarray) -> list[dict]:
        return M.classification_report(self._confusion(counts), self.labels)

    def _confusion(self, counts: np.ndarray) -> np.ndarray:
        C = len(self.labels)
        return np.asarray(counts).reshape(C, C)


class TagRunner(LMRunner):
    """One label per token; counts: (true positives, predicted, gold) entities per type
    [T, 3], over each sequence's labelled tokens (padding and later sub-tokens left out)."""

    kind = "tag"

    def __init__(self, labels: list[str]) -> None:
        self.labels = labels
        self.types = M.entity_types(labels)
        self.num_counts = 3 * len(self.types)

    def tokens(self, rows_BW: Tensor) -> Tensor:
        return unpack_tag(rows_BW)[0]

    def forward(self, module: Any, rows_BW: Tensor) -> LMOutput:
        tokens_BS, labels_BS = unpack_tag(rows_BW)
        return module(tokens_BS, labels_BS=labels_BS)

    def weight(self, rows_BW: Tensor) -> float:
        """The labelled tokens, over which the loss is a mean."""
        return float((unpack_tag(rows_BW)[1] != IGNORE).sum())

    def counts(self, out: LMOutput, rows_BW: Tensor) -> Tensor:
        labels_BS = unpack_tag(rows_BW)[1].cpu()
        pred_BS = out.logits.argmax(-1).cpu()
        keep_BS = labels_BS != IGNORE
        gold = [row[keep].tolist() for row, keep in zip(labels_BS, keep_BS, strict=True)]
        pred = [row[keep].tolist() for row, keep in zip(pred_BS, keep_BS, strict=True)]
        counts_T3 = M.entity_counts(gold, pred, self.labels)
        return torch.from_numpy(counts_T3).flatten().double().to(rows_BW.device)

    def metrics(self, counts: np.ndarray) -> dict[str, float]:
        scores = M.tagging_scores(np.asarray(counts).reshape(-1, 3))
        return {f"val_{k}": v for k, v in scores.items()}

    def report(self, counts: np.ndarray) -> list[dict]:
        return M.tagging_report(np.asarray(counts).reshape(-1, 3), self.types)


def build_runner(kind: str, labels: list[str] | None) -> LMRunner:
    if kind == "lm":
        return LMRunner()
    assert labels is not None, "a task's data gives its labels"
    return ClassifyRunner(labels) if kind == "classify" else TagRunner(labels)
