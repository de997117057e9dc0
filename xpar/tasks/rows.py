"""Labelled examples as single int64 rows, so that they travel through the LM's data machinery
(SequenceLoader, eval_batches: deterministic, resumable, sharded over ranks) unchanged.

Layouts (S = data.seq_len, right-padded with token id 0):
- classify: `[tok_0 .. tok_{S-1}, length, label]`, width S + 2; `length` >= 1 real tokens.
- tag: `[tok_0 .. tok_{S-1}, lab_0 .. lab_{S-1}]`, width 2 S; a label of -100 marks a token
  without one (padding, or a word's later sub-tokens).

Legend: N examples, B batch, S sequence, W row width.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE = -100  # the label of a token that has none (cross_entropy's ignore_index)


def row_width(kind: str, seq_len: int) -> int:
    return seq_len + 2 if kind == "classify" else 2 * seq_len


def pack_classify(tokens: list[list[int]], labels: list[int], seq_len: int) -> Tensor:
    """[N, S + 2] rows from token id lists (each 1..S long) and their label ids."""
    rows_NW = torch.zeros(len(tokens), seq_len + 2, dtype=torch.long)
    for i, (ids, label) in enumerate(zip(tokens, labels, strict=True)):
        rows_NW[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        rows_NW[i, seq_len], rows_NW[i, seq_len + 1] = len(ids), label
    return rows_NW


def pack_tag(tokens: list[list[int]], tags: list[list[int]], seq_len: int) -> Tensor:
    """[N, 2 S] rows from token id lists (each up to S long) and per-token label ids."""
    rows_NW = torch.zeros(len(tokens), 2 * seq_len, dtype=torch.long)
    rows_NW[:, seq_len:] = IGNORE
    for i, (ids, labels) in enumerate(zip(tokens, tags, strict=True)):
        rows_NW[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        rows_NW[i, seq_len : seq_len + len(labels)] = torch.tensor(labels, dtype=torch.long)
    return rows_NW


def unpack_classify(rows_BW: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens [B, S], lengths [B], labels [B])."""
    S = rows_BW.shape[1] - 2
    return rows_BW[:, :S], rows_BW[:, S], rows_BW[:, S + 1]


def unpack_tag(rows_BW: Tensor) -> tuple[Tensor, Tensor]:
    """(tokens [B, S], labels [B, S])."""
    S = rows_BW.shape[1] // 2
    return rows_BW[:, :S], rows_BW[:, S:]
