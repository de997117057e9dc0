"""Differentiable all-to-all and the row gathers/sums around it. Only the dispatcher uses these.

Legend: R rows, D model dim, K entries per row of an index table.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup


class _AllToAll(torch.autograd.Function):
    """Rows split by destination go out, rows split by source come in; backward is the same
    exchange the other way."""

    @staticmethod
    def forward(ctx, x_RD: Tensor, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (in_splits, out_splits), group
        out = x_RD.new_empty((sum(out_splits), *x_RD.shape[1:]))
        dist.all_to_all_single(out, x_RD.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad, out_splits, in_splits, ctx.group), None, None, None


def all_to_all(
    x_RD: Tensor, out_splits: list[int], in_splits: list[int], group: ProcessGroup | None
) -> Tensor:
    """Send in_splits[i] rows to rank i of `group`, receive out_splits[i] from it. A group of
    one (or None) keeps the rows where they are."""
    if group is None or dist.get_world_size(group) == 1:
        return x_RD
    return _AllToAll.apply(x_RD, out_splits, in_splits, group)


def exchange_counts(send_PC: Tensor, group: ProcessGroup | None) -> Tensor:
    """[P, C] counts this rank sends to each rank -> [P, C] counts it receives from each."""
    if group is None or dist.get_world_size(group) == 1:
        return send_PC
    recv_PC = torch.empty_like(send_PC)
    dist.all_to_all_single(recv_PC, send_PC.contiguous(), group=group)
    return recv_PC


def _padded(src_RD: Tensor, table_SK: Tensor) -> Tensor:
    """[S, K, D] rows of src named by table (-1 names a zero row)."""
    src = torch.cat([src_RD, src_RD.new_zeros(1, *src_RD.shape[1:])])
    return src[torch.where(table_SK >= 0, table_SK, src_RD.shape[0])]


class _GatherRows(torch.autograd.Function):
    """out[m] = src[index[m]]. `table[s]` lists every m with index[m] == s (-1 padded), so the
    backward pass is a gather and sum too: deterministic, no atomics."""

    @staticmethod
    def forward(ctx, src_SD: Tensor, index_M: Tensor, table_SK: Tensor) -> Tensor:
        ctx.save_for_backward(index_M, table_SK)
        return src_SD[index_M]

    @staticmethod
    def backward(ctx, grad_MD: Tensor):
        index_M, table_SK = ctx.saved_tensors
        return _SumRows.apply(grad_MD, table_SK, index_M), None, None


class _SumRows(torch.autograd.Function):
    """out[s] = sum_k src[table[s, k]] over entries >= 0; `index[m]` is the s that row m goes
    to, so the backward pass is a gather."""

    @staticmethod
    def forward(ctx, src_MD: Tensor, table_SK: Tensor, index_M: Tensor) -> Tensor:
        ctx.save_for_backward(index_M, table_SK)
        return _padded(src_MD, table_SK).sum(1)

    @staticmethod
    def backward(ctx, grad_SD: Tensor):
        index_M, table_SK = ctx.saved_tensors
        return _GatherRows.apply(grad_SD, index_M, table_SK), None, None


def gather_rows(src_SD: Tensor, index_M: Tensor, table_SK: Tensor) -> Tensor:
    """src[index], differentiable; `table` is index's inverse (see _GatherRows)."""
    return _GatherRows.apply(src_SD, index_M, table_SK)


def sum_rows(src_MD: Tensor, table_SK: Tensor, index_M: Tensor) -> Tensor:
    """Per-row sums of src rows named by table, differentiable (see _SumRows)."""
    return _SumRows.apply(src_MD, table_SK, index_M)
