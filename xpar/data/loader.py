"""Deterministic, resumable batches for one data-parallel rank.

Legend: N sequences in the source, L tokens per sequence (seq_len + 1), B global batch,
R data-parallel ranks, b micro-batch per rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import Tensor

from xpar.checks import UserError


class SequenceSource(Protocol):
    """N sequences of L token ids, fetched by index."""

    def __len__(self) -> int: ...

    def take(self, indices: list[int]) -> Tensor:
        """[len(indices), L] int64 token ids, in the order given."""
        ...


class TensorSequences:
    """A SequenceSource over an in-memory [N, L] tensor."""

    def __init__(self, tokens_NL: Tensor) -> None:
        self.tokens_NL = tokens_NL

    def __len__(self) -> int:
        return self.tokens_NL.shape[0]

    def take(self, indices: list[int]) -> Tensor:
        return self.tokens_NL[indices].long()


def check_token_ids(tokens: Tensor, vocab_size: int, where: str) -> None:
    """Token ids must lie in [0, vocab_size): checked on the CPU, before any device sees them
    (on CUDA an out-of-range embedding index is an unrecoverable device assert)."""
    if tokens.numel() == 0:
        return
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        bad = high if high >= vocab_size else low
        raise UserError(
            f"{where}: token id {bad} is outside [0, model.vocab_size={vocab_size}); use a "
            f"tokenizer whose vocabulary fits the model or raise model.vocab_size"
        )


class SequenceLoader:
    """Shuffled epochs over a SequenceSource. Every optimizer step takes the next B sequences of
    the epoch's permutation (drawn from `seed` and the epoch number); rank r reads its share
    [r * B / R, (r + 1) * B / R) of them, split into micro-batches of b. An epoch's incomplete
    tail is skipped, so all ranks always agree. With `overfit_batches=k` the first k global
    batches repeat for ever (a debugging aid). The position is (epoch, step in epoch)."""

    def __init__(
        self,
        source: SequenceSource,
        global_batch: int,
        micro_batch: int,
        dp_rank: int = 0,
        dp_world: int = 1,
        seed: int = 0,
        overfit_batches: int = 0,
        name: str = "train",
    ) -> None:
        self.source, self.global_batch, self.micro_batch = source, global_batch, micro_batch
        self.dp_rank, self.dp_world, self.seed = dp_rank, dp_world, seed
        self.steps_per_epoch = len(source) // global_batch
        if self.steps_per_epoch == 0:
            raise UserError(
                f"the {name} split has {len(source)} sequences, fewer than one global batch "
                f"(data.batch_size={global_batch}); add data or lower data.batch_size"
            )
        if overfit_batches:
            self.steps_per_epoch = min(overfit_batches, self.steps_per_epoch)
        self.overfit = overfit_batches > 0
        self.epoch = self.step = 0
        self._perm: Tensor | None = None

    def _permutation(self) -> Tensor:
        if self._perm is None:
            epoch = 0 if self.overfit else self.epoch
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(len(self.source), generator=gen)
        return self._perm

    def next_step(self) -> list[Tensor]:
        """This rank's micro-batches [b, L] for the next optimizer step."""
        start = self.step * self.global_batch
        per_rank = self.global_batch // self.dp_world
        lo = start + self.dp_rank * per_rank
        indices = self._permutation()[lo : lo + per_rank].tolist()
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step, self._perm = self.epoch + 1, 0, None
        return list(self.source.take(indices).split(self.micro_batch))

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "sequences",
            "epoch": self.epoch,
            "step": self.step,
            "global_batch": self.global_batch,
            "sequences": len(self.source),
            "steps_per_epoch": self.steps_per_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position; it only means the same thing over the same data and batch."""
        check_same_data(state, self.state_dict(), ("global_batch", "sequences", "steps_per_epoch"))
        self.epoch, self.step, self._perm = int(state["epoch"]), int(state["step"]), None


def check_same_data(saved: dict[str, Any], now: dict[str, Any], keys: tuple[str, ...]) -> None:
    """A saved data position must come from the same kind of data, batch and size."""
    names = {
        "global_batch": "data.batch_size",
        "sequences": "the number of training sequences",
        "steps_per_epoch": "trainer.overfit_batches or the data",
        "per_rank": "data.batch_size / ranks",
        "window_size": "data.shuffle_buffer",
    }
    if saved.get("kind") != now["kind"]:
        raise UserError(
            f"the checkpoint's data position is for {saved.get('kind', 'other')} data, this run "
            f"reads {now['kind']}; resume with the data the run was started with"
        )
    for key in keys:
        if saved.get(key) != now[key]:
            raise UserError(
                f"the checkpoint's data position was saved with {names.get(key, key)}="
                f"{saved.get(key)}, this run has {now[key]}; resume with the same data and "
                f"data.batch_size, or start a new run from the weights"
            )


def eval_batches(
    source: SequenceSource,
    batch: int,
    max_batches: int | None = None,
    dp_rank: int = 0,
    dp_world: int = 1,
) -> Iterator[Tensor]:
    """The validation split in order, `batch` sequences per rank at a time. Every rank gets
    the same number of batches (so collectives inside the model stay matched); shares of the
    last batch differ by at most one sequence and may be empty."""
    n = len(source)
    step = batch * dp_world
    if max_batches is not None:
        n = min(n, max_batches * step)
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        bounds = torch.linspace(lo, hi, dp_world + 1).round().long().tolist()
        yield source.take(list(range(bounds[dp_rank], bounds[dp_rank + 1])))
