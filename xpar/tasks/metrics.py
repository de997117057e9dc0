"""Evaluation metrics of the task heads, as pure functions of counts (which sum over ranks).

Classification: a confusion matrix [C, C] (rows gold, columns predicted) gives accuracy,
macro-F1 (the mean F1 over the labels that occur in the gold labels or the predictions, as
scikit-learn's `f1_score(average="macro")`) and per-label precision/recall/F1/support.

Tagging: entity level, as seqeval's default (conlleval) mode. Tags are `O`, or a prefix B-, I-,
E- or S- and a type (`B-LOW`); a label without one of these prefixes counts as `I-` of itself.
An entity is a chunk of one type; it begins at B-/S-, or at an I-/E- whose type differs from
the previous tag's, and ends before O, B-, S- or another type, or after E-/S-. A predicted
entity counts only if the gold sequence has one of the same type, start and end. Counts per
type [T, 3] (true positives, predicted, gold) give micro precision/recall/F1 and per-type ones.

Legend: C labels, T entity types, N examples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

PREFIXES = ("B", "I", "E", "S")


def confusion_matrix(gold_N: Tensor, pred_N: Tensor, num_labels: int) -> Tensor:
    """[C, C] int64 counts of (gold, predicted) label pairs."""
    flat = gold_N.long() * num_labels + pred_N.long()
    return torch.bincount(flat, minlength=num_labels * num_labels).view(num_labels, num_labels)


def _prf(tp: np.ndarray, pred: np.ndarray, gold: np.ndarray) -> tuple[np.ndarray, ...]:
    """Precision, recall and F1 (0 where undefined), elementwise."""
    tp, pred, gold = (np.asarray(x, dtype=np.float64) for x in (tp, pred, gold))
    precision = np.divide(tp, pred, out=np.zeros_like(tp), where=pred > 0)
    recall = np.divide(tp, gold, out=np.zeros_like(tp), where=gold > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(tp), where=total > 0)
    return precision, recall, f1


def classification_scores(conf_CC: np.ndarray) -> dict[str, float]:
    """{"accuracy", "macro_f1"} of a confusion matrix."""
    conf_CC = np.asarray(conf_CC, dtype=np.float64)
    tp, gold, pred = np.diag(conf_CC), conf_CC.sum(1), conf_CC.sum(0)
    _, _, f1 = _prf(tp, pred, gold)
    present = (gold + pred) > 0
    return {
        "accuracy": float(tp.sum() / max(conf_CC.sum(), 1.0)),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
    }


def classification_report(conf_CC: np.ndarray, labels: Sequence[str]) -> list[dict]:
    """Per label: precision, recall, F1 and support (gold count)."""
    conf_CC = np.asarray(conf_CC, dtype=np.float64)
    gold = conf_CC.sum(1)
    precision, recall, f1 = _prf(np.diag(conf_CC), conf_CC.sum(0), gold)
    return [_row(name, precision[i], recall[i], f1[i], gold[i]) for i, name in enumerate(labels)]


def _row(name: str, p: float, r: float, f: float, support: float) -> dict:
    return {"label": name, "precision": float(p), "recall": float(r), "f1": float(f),
            "support": int(support)}  # fmt: skip


def parse_tag(label: str) -> tuple[str, str]:
    """(prefix, type) of a tag: ("O", "") for O, ("I", label) for a label without a prefix."""
    if label == "O":
        return "O", ""
    head, sep, rest = label.partition("-")
    if sep and head in PREFIXES and rest:
        return head, rest
    return "I", label


def entity_types(labels: Sequence[str]) -> list[str]:
    """The sorted entity types of a tag set."""
    return sorted({t for p, t in map(parse_tag, labels) if p != "O"})


def _ends(prev: str, tag: str, prev_type: str, type_: str) -> bool:
    if prev in ("E", "S"):
        return True
    if prev in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev != "O" and prev_type != type_


def _starts(prev: str, tag: str, prev_type: str, type_: str) -> bool:
    if tag in ("B", "S"):
        return True
    if tag in ("I", "E") and prev in ("E", "S", "O"):
        return True
    return tag != "O" and prev_type != type_


def spans(tags: Sequence[tuple[str, str]]) -> set[tuple[str, int, int]]:
    """The entities (type, first, last) of a sequence of parsed tags (see parse_tag)."""
    out, start = set(), None
    prev, prev_type = "O", ""
    for i, (tag, type_) in enumerate([*tags, ("O", "")]):
        if start is not None and _ends(prev, tag, prev_type, type_):
            out.add((prev_type, start, i - 1))
            start = None
        if _starts(prev, tag, prev_type, type_):
            start = i
        prev, prev_type = tag, type_
    return out


def entity_counts(
    gold: Sequence[Sequence[int]], pred: Sequence[Sequence[int]], labels: Sequence[str]
) -> np.ndarray:
    """[T, 3] (true positives, predicted, gold) per entity type (entity_types order) over
    pairs of label-id sequences."""
    types = entity_types(labels)
    index = {t: i for i, t in enumerate(types)}
    parsed = [parse_tag(name) for name in labels]
    counts_T3 = np.zeros((len(types), 3), dtype=np.int64)
    for gold_ids, pred_ids in zip(gold, pred, strict=True):
        g = spans([parsed[i] for i in gold_ids])
        p = spans([parsed[i] for i in pred_ids])
        for col, found in ((0, g & p), (1, p), (2, g)):
            for type_, _, _ in found:
                counts_T3[index[type_], col] += 1
    return counts_T3


def tagging_scores(counts_T3: np.ndarray) -> dict[str, float]:
    """Micro {"precision", "recall", "f1"} over all entity types."""
    tp, pred, gold = np.asarray(counts_T3, dtype=np.float64).sum(0)
    p, r, f = _prf(np.array([tp]), np.array([pred]), np.array([gold]))
    return {"precision": float(p[0]), "recall": float(r[0]), "f1": float(f[0])}


def tagging_report(counts_T3: np.ndarray, types: Sequence[str]) -> list[dict]:
    """Per entity type: precision, recall, F1 and support (gold entities)."""
    counts_T3 = np.asarray(counts_T3)
    p, r, f = _prf(counts_T3[:, 0], counts_T3[:, 1], counts_T3[:, 2])
    return [_row(t, p[i], r[i], f[i], counts_T3[i, 2]) for i, t in enumerate(types)]


def format_report(rows: list[dict], title: str) -> str:
    """A fixed-width table of report rows."""
    width = max([len(title), *(len(r["label"]) for r in rows)])
    lines = [f"{title:<{width}}  precision  recall      f1  support"]
    for r in rows:
        lines.append(
            f"{r['label']:<{width}}  {r['precision']:9.4f}  {r['recall']:6.4f}  {r['f1']:6.4f}"
            f"  {r['support']:7d}"
        )
    return "\n".join(lines)
